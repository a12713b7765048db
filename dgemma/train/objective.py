"""The block-diffusion training objective (spec sections 4.1-4.5), as an ``nn.Module`` around the model.

Per example: ``t ~ U(eps, 1)``; one response block ``b`` chosen uniformly; each of its positions replaced
with probability ``t`` by a uniform token. The encoder runs causally over the clean full sequence
(prompt + response + EOS fill) and yields the next-token (AR) loss; its per-layer K/V feed the decoder,
whose canvas (the noisy block, at its absolute positions) sees the prompt and the clean blocks strictly
before ``b`` (sliding layers: only the last ``W - 1`` of those, the window inference sees) and itself
bidirectionally. Self-conditioning is the two-pass scheme: a no-grad pass without it, then, for examples
whose coin came up (p = 0.5), the softmax of those logits as the signal of the graded pass. The loss sums
cross-entropy over every supervised canvas position, corrupted or not, with no 1/t weight.

``kind = "ar"`` (not in the spec) trains only the encoder's next-token loss and never runs the decoder: an
autoregressive model of the same architecture, as a baseline trained on the same data and budget.

``encoder_loss_weight = 0`` drops the AR co-loss; the encoder then runs only over the positions some canvas
of the batch reads (prompt and earlier blocks), which gives the same K/V for less work.

Fixed positions (not in the spec; :attr:`Example.fixed`, from the data's ``"fixed"`` spans: a puzzle's
clues) are never corrupted: the canvas always shows them clean, as an inference-time pin does. They stay in
the loss, where predicting them is trivial; so the model's output there, which is also the self-conditioning
signal at inference (the sampler feeds back its distribution at pinned positions too), is the token itself.

``noise_power = p`` (not in the spec; default 1) skews the noise level: ``t = eps + (1 - eps) u^(1/p)``.

``focal_gamma = g`` (not in the spec; default 0, plain cross-entropy) weights each canvas position's
cross-entropy by ``(1 - p)^g``, ``p`` the model's probability of the right token there, differentiated
through: the focal loss of Lin et al. (2017), the form of MGDM's token-level reweighting (Ye et al., 2024).
Positions the model already gets right (a puzzle's clues, easy cells) weigh little, hard ones weigh up to
1. The AR co-loss stays plain.

``draws_per_example = K > 1`` (not in the spec; default 1) gives each example K independent corruptions that
share one encoder pass: the decoder runs over ``B * K`` canvases, example-major, each reading its example's
clean K/V. The K noise levels are stratified (``t_j = t_0 + j/K`` wrapped into ``[eps, 1)``), so one example
is seen lightly and heavily corrupted in the same step. The encoder runs over prompt + answer, forward and
backward, so K canvases cost less than K steps (Sudoku, K = 2: 1.3-1.5x the time of K = 1; there it did not
pay at equal time, see docs/TRAINING.md). Draw 0 is exactly the K = 1 draw.

Every random draw of an example comes from a generator seeded by (seed, step, slot in the global batch):
the same example gets the same noise whatever the number of processes or micro-batches, and a resumed
run redraws exactly what the interrupted one would have.

The module returns loss *sums*; the trainer divides by global token counts (spec 4.5). Wrapping the
objective in a module gives FSDP2 one root whose ``forward`` covers the embedding, LM head and
self-conditioning block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dgemma.train.data import Batch, Example

TRAIN_STREAM, EVAL_STREAM = 0, 1
OBJECTIVES = ("diffusion", "ar")


@dataclass(frozen=True)
class ObjectiveConfig:
    # "diffusion": spec section 4 (+ the encoder's next-token co-loss). "ar" (not in the spec): only the
    # encoder's next-token loss, no decoder pass: an autoregressive baseline of the same architecture.
    kind: str = "diffusion"
    eps: float = 1e-3  # t ~ U(eps, 1)
    # Not in the spec (default 1, the spec's uniform t): t = eps + (1 - eps) * u ** (1 / noise_power), u ~ U(0, 1).
    # Above 1 it draws heavier noise more often (2: density rising linearly toward full noise).
    noise_power: float = 1.0
    self_conditioning_p: float = 0.5
    encoder_loss_weight: float = 1.0
    draws_per_example: int = 1  # K corruptions of each example, sharing its encoder pass
    focal_gamma: float = 0.0  # not in the spec: canvas CE weighted by (1 - p)^gamma (focal loss); 0 = plain CE
    loss_chunk_rows: int = 2048  # LM-head rows per checkpointed cross-entropy chunk


@dataclass(frozen=True)
class Draw:
    """The random choices for one example: noise level, block, corrupted positions, their tokens, SC coin."""

    t: float
    block: int
    replace: torch.Tensor  # [C] bool (never at a fixed position)
    tokens: torch.Tensor  # [C] long, uniform over the vocabulary
    self_condition: bool
    fixed: torch.Tensor | None = None  # [C] bool: never corrupted (Example.fixed); None: no fixed position


def draws(example: Example, seed: int, step: int, slot: int, vocab: int, cfg: ObjectiveConfig,
          stream: int = TRAIN_STREAM) -> list[Draw]:
    """The ``cfg.draws_per_example`` draws of one example, from one generator seeded by (seed, step, slot)."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + stream) * 1_000_033 + step) * 65_537 + slot
                                      & (2**63 - 1))
    c, k = example.block, cfg.draws_per_example
    first = float(torch.rand((), generator=g))
    out: list[Draw] = []
    for j in range(k):
        u = (first + j / k) % 1.0  # stratified: the j-th level a K-th of the range above the first, wrapped
        t = cfg.eps + (1.0 - cfg.eps) * u ** (1.0 / cfg.noise_power)  # (u ** 1.0 is exactly u)
        block = int(torch.randint(example.n_blocks, (), generator=g))
        replace = torch.rand(c, generator=g) < t
        tokens = torch.randint(0, vocab, (c,), generator=g)
        sc = bool(torch.rand((), generator=g) < cfg.self_conditioning_p)
        fixed = _fixed_in_block(example, block)
        if fixed is not None:
            replace &= ~fixed
        out.append(Draw(t, block, replace, tokens, sc, fixed))
    return out


def _fixed_in_block(example: Example, block: int) -> torch.Tensor | None:
    """``[C]`` bool: the example's fixed positions inside response block ``block``, or None when none is."""
    lo = block * example.block
    inside = [i - lo for i in example.fixed if lo <= i < lo + example.block]
    if not inside:
        return None
    mask = torch.zeros(example.block, dtype=torch.bool)
    mask[inside] = True
    return mask


def draw(example: Example, seed: int, step: int, slot: int, vocab: int, cfg: ObjectiveConfig,
         stream: int = TRAIN_STREAM) -> Draw:
    """The first (with ``draws_per_example = 1`` the only) draw of :func:`draws`."""
    return draws(example, seed, step, slot, vocab, dataclasses.replace(cfg, draws_per_example=1), stream)[0]


class TrainEncoderKV:
    """Encoder K/V strategy for training: causal (and windowed) attention over the ``s`` positions it is given
    (the whole sequence, or with no AR loss only those the canvases read), no cache;
    keeps each layer's K/V for the decoder. ``setdefault`` so that activation-checkpoint recomputation
    does not replace the tensors the decoder's graph already holds."""

    def __init__(self, s: int, window: int, device):
        q = torch.arange(s, device=device)
        causal = q[None, :] <= q[:, None]  # [S(query), S(key)]
        self.masks = {False: causal[None, None], True: (causal & (q[None, :] > q[:, None] - window))[None, None]}
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer: int, sliding: bool, k: torch.Tensor, v: torch.Tensor):
        self.kv.setdefault(layer, (k, v))
        return k, v, self.masks[sliding]


class TrainDecoderKV:
    """Decoder K/V strategy for training: keys = [clean encoder K/V (S) ; canvas K/V (C)].

    Encoder key ``j`` is visible to the canvas of a row iff ``j < start`` (prompt and strictly earlier
    blocks), and on sliding layers also ``j >= start - W + 1``; the canvas sees itself.
    """

    def __init__(self, enc_kv: dict, start: torch.Tensor, s: int, c: int, window: int,
                 rows: torch.Tensor | None = None, detach: bool = False):
        self.enc, self.rows, self.detach = enc_kv, rows, detach
        slots = torch.arange(s, device=start.device)
        full = slots[None, :] < start[:, None]  # [B, S]
        sliding = full & (slots[None, :] >= start[:, None] - window + 1)
        canvas = torch.ones(start.shape[0], c, dtype=torch.bool, device=start.device)
        self.masks = {False: torch.cat([full, canvas], 1)[:, None, None, :],
                      True: torch.cat([sliding, canvas], 1)[:, None, None, :]}  # [B, 1, 1, S + C]

    def __call__(self, layer: int, sliding: bool, k: torch.Tensor, v: torch.Tensor):
        ek, ev = self.enc[layer]
        if self.rows is not None:
            ek, ev = ek[self.rows], ev[self.rows]
        if self.detach:
            ek, ev = ek.detach(), ev.detach()
        return torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2), self.masks[sliding]


def _ce_sum(model, h: torch.Tensor, targets: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    if not gamma:
        return F.cross_entropy(model.logits(h), targets, reduction="sum")
    ce = F.cross_entropy(model.logits(h), targets, reduction="none")  # [N]
    # (1 - p)^gamma, p = exp(-ce). A sure right answer has ce = 0 exactly (fp32, soft-capped logits): the
    # floor keeps the weight's gradient there finite (0) for gamma < 1.
    weight = (-torch.expm1(-ce)).clamp_min(torch.finfo(ce.dtype).tiny) ** gamma
    return (weight * ce).sum()


def lm_loss_sum(model, h: torch.Tensor, targets: torch.Tensor, chunk_rows: int, gamma: float = 0.0
                ) -> torch.Tensor:
    """Summed cross-entropy of the soft-capped LM head over ``h [N, d]`` against ``targets [N]``; with
    ``gamma``, each row's term weighted by ``(1 - p)^gamma`` (``focal_gamma``).

    Chunked and checkpointed, so no more than ``chunk_rows x vocab`` fp32 logits exist at once, forward
    or backward (a 262k vocabulary makes the full logits the largest tensor of a step).
    """
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for i in range(0, h.shape[0], chunk_rows):
        hc, tc = h[i: i + chunk_rows], targets[i: i + chunk_rows]
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(_ce_sum, model, hc, tc, gamma, use_reentrant=False)
        else:
            total = total + _ce_sum(model, hc, tc, gamma)
    return total


class Objective(nn.Module):
    """``forward(batch, draws) -> (diffusion CE sum, AR CE sum)`` for one micro-batch (the AR sum is a zero,
    not computed, when ``encoder_loss_weight`` is 0).

    ``draws``: K per example of the batch, example-major (``len(draws) = K * B``); ignored, and the
    diffusion sum a zero, with ``kind = "ar"``.

    ``net`` is what is trained and saved: the DiffusionGemma itself, or a peft model around it.
    """

    def __init__(self, net: nn.Module, cfg: ObjectiveConfig, checkpoint: bool = False):
        super().__init__()
        self.net, self.cfg, self.checkpoint = net, cfg, checkpoint

    @property
    def model(self):
        return self.net.get_base_model() if hasattr(self.net, "get_base_model") else self.net

    def forward(self, batch: Batch, draws: list[Draw], first_pass: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``first_pass=True`` runs the self-conditioning pass on every row (the signal still gated by each
        row's coin), so that all processes of a sharded run build the same graph; ``None``: only as needed."""
        hd, clean, ar = self.canvas_states(batch, draws, first_pass)
        if hd is None:  # kind = "ar": no decoder pass at all
            return torch.zeros((), dtype=ar.dtype, device=ar.device), ar
        diff = lm_loss_sum(self.model, hd.reshape(-1, hd.shape[-1]), clean.reshape(-1), self.cfg.loss_chunk_rows,
                           self.cfg.focal_gamma)
        return diff, ar

    def canvas_states(self, batch: Batch, draws: list[Draw], first_pass: bool | None = None
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """The decoder's final hidden states over the corrupted canvases ``[B*K, C, d]`` (``model.logits`` of
        them are the canvas predictions), their clean tokens ``[B*K, C]`` and the AR CE sum; ``(None, None,
        ar)`` with ``kind = "ar"``."""
        m = self.model
        c, window = m.cfg.canvas_length, m.cfg.sliding_window
        ids = batch.ids  # [B, S]
        b, s = ids.shape
        dev = ids.device

        ar_only = self.cfg.kind == "ar"
        if not ar_only:
            # Decoder rows: the chosen block of each canvas, at its absolute positions. K draws per example
            # make B * K canvases, example-major; `src` maps each canvas to its example's row.
            k = len(draws) // b
            if k * b != len(draws):
                raise ValueError(f"{len(draws)} draws for {b} examples: expected a multiple")
            src = torch.arange(b, device=dev).repeat_interleave(k) if k > 1 else None  # [B*K] or None
            rows_ids = ids if src is None else ids[src]  # [B*K, S]
            prefix = batch.prefix if src is None else batch.prefix[src]
            start = prefix + c * torch.tensor([d.block for d in draws], device=dev)  # [B*K]
            cpos = start[:, None] + torch.arange(c, device=dev)  # [B*K, C]
            clean = rows_ids.gather(1, cpos)

        # Encoder: clean sequence, causal; AR loss over pairs (i, i+1) that are both real tokens. With no
        # AR loss to compute, it runs only over the keys some canvas reads (positions < max start): causal
        # attention makes their K/V the same as over the whole sequence.
        with_ar = ar_only or self.cfg.encoder_loss_weight > 0
        s_enc = s if with_ar else max(1, int(start.max()))
        enc = TrainEncoderKV(s_enc, window, dev)
        positions = torch.arange(s_enc, device=dev).expand(b, s_enc)
        h = m.run_layers(m.embed(ids[:, :s_enc]), positions, enc, encoder=True, checkpoint=self.checkpoint)
        if with_ar:  # h: [B, S, d]
            pairs = torch.arange(s - 1, device=dev)[None, :] < (batch.lengths - 1)[:, None]  # [B, S-1]
            ar = lm_loss_sum(m, h[:, :-1][pairs], ids[:, 1:][pairs], self.cfg.loss_chunk_rows)
        else:  # a zero that keeps the sum's dtype and device (weight 0: the AR loss is not computed)
            ar = torch.zeros((), dtype=torch.float32, device=dev)
        if ar_only:
            return None, None, ar

        # Decoder: the chosen blocks, corrupted.
        s = s_enc
        replace = torch.stack([d.replace for d in draws]).to(dev)
        noisy = torch.where(replace, torch.stack([d.tokens for d in draws]).to(dev), clean)
        dec = TrainDecoderKV(enc.kv, start, s, c, window, rows=src)
        b = len(draws)  # from here on, rows are canvases

        soft = None
        coins = [d.self_condition for d in draws]
        # Sharded runs self-condition every row and gate the signal per row, so that each process builds
        # the same graph (FSDP gathers the same parameters); otherwise only the rows whose coin came up.
        rows = list(range(b)) if first_pass else [i for i, on in enumerate(coins) if on]
        if rows:
            idx = torch.tensor(rows, device=dev)
            with torch.no_grad():  # pass 1: no self-conditioning, not back-propagated
                x1 = m.self_conditioning(m.embed(noisy[idx]), None)
                kv1 = TrainDecoderKV(enc.kv, start[idx], s, c, window, rows=idx if src is None else src[idx],
                                     detach=True)
                sc_logits = m.logits(m.run_layers(x1, cpos[idx], kv1, encoder=False))  # [n, C, V] fp32
            rows_soft = m.soft_embedding(sc_logits)  # [n, C, d]; graded through the embedding matrix
            if first_pass:
                soft = rows_soft * torch.tensor(coins, device=dev, dtype=rows_soft.dtype)[:, None, None]
            else:
                soft = rows_soft.new_zeros(b, c, rows_soft.shape[-1]).index_copy(0, idx, rows_soft)
        x = m.self_conditioning(m.embed(noisy), soft)  # zero rows of `soft` = no signal for that example
        hd = m.run_layers(x, cpos, dec, encoder=False, checkpoint=self.checkpoint)  # [B, C, d]
        return hd, clean, ar


def token_counts(examples: list[Example], draws_per_example: int = 1) -> tuple[int, int]:
    """``(supervised canvas positions, AR pairs)`` of a batch: the loss denominators (spec 4.5)."""
    return draws_per_example * sum(e.block for e in examples), sum(len(e.ids) - 1 for e in examples)
