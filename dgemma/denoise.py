"""The math of one denoising step, from the decoder's hidden states to the next canvas's ingredients.

Given final hidden states ``h [n, C, d]``, the temperature and one uniform per position, a step needs the
soft-capped tempered logits only to derive four small things: per-position entropy, argmax, an
inverse-CDF sample, and the self-conditioning soft embedding that the next step feeds back. Two paths:

* :func:`step_reference`: materialises ``[n, C, V]`` fp32 logits, then does each piece separately, as the
  spec (section 5) reads. Slow and memory hungry (vocab 262144: 268 MB per row), obviously right.
* :func:`step_fused`: walks the flattened positions in chunks whose ``[m, V]`` logits fit in cache (CPU)
  or in a bounded buffer (GPU), computing all four results from one set of logits, with the softmax shared
  between entropy, sampling and the soft embedding. Never holds more than one chunk of vocab-sized rows.
  Its logits come from :func:`tempered_logits` (the LM head in vocabulary blocks on a CPU, the soft-cap
  as a sigmoid) and its entropy from the probabilities, without log-probabilities.

Both take an optional allowed-token mask (``set_index [n, C]`` rows of ``table [S, V]`` bool, -1: any
token; see ``dgemma.constraints``): disallowed tokens' tempered logits become :data:`MASKED` (the lowest
float, so their probability is exactly 0 and entropy, sampling, argmax and the soft embedding are over the
allowed tokens). The fused path gathers the mask rows of a chunk only, and skips chunks without a
constrained position (without a mask the step is unchanged, bitwise).

Tests compare the two. The soft embedding follows the reference's rounding: in a low-precision model the
tempered logits are cast to the model dtype before their softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Bytes of fp32 logits per chunk (GPU: bounded memory), and the fewest positions per chunk: every chunk
# streams the whole [V, d] embedding through two matmuls, so fewer rows than this make them memory-bound
# (measured on a 2-core CPU, vocab 32000: 64 rows per chunk made a step 25% slower than 256 rows).
CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 512 << 20}
MIN_CHUNK_ROWS = 256
# A disallowed token's tempered logit: the lowest finite fp32, not -inf, so that ``p * log p`` and
# ``p * (z_max - z)`` are 0 * finite = 0 there (probability exactly 0 all the same).
MASKED = torch.finfo(torch.float32).min


@dataclass
class StepStats:
    entropy: torch.Tensor  # [n, C] fp32, of the tempered distribution
    argmax: torch.Tensor  # [n, C] long
    sampled: torch.Tensor  # [n, C] long, inverse-CDF draws with the given uniforms
    soft: torch.Tensor | None  # [n, C, d] model dtype: softmax(tempered logits) @ E * sqrt(d), for the next step


def token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy ``[..., C]`` of categorical distributions given as log-probabilities ``[..., C, V]``."""
    return -(logp.exp() * logp).sum(-1)


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``probs [m, V]`` with uniforms ``u [m]`` (in place of multinomial).

    A draw lands on a token of positive probability, except where ``u * total`` rounds up to the total:
    then the last token, or ``last [m]`` (each row's highest allowed id, for masked rows)."""
    cdf = torch.cumsum(probs, dim=-1)  # [m, V]
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    if last is not None:
        return torch.minimum(idx, last)
    return idx.clamp_(max=probs.shape[-1] - 1)


@dataclass
class Mask:
    """An allowed-token mask on a device: ``bias [S + 1, V]`` fp32 (0 where allowed, :data:`MASKED` where
    not; row 0: nothing forbidden) and each set's highest allowed id ``last [S + 1]``; rows are looked up
    with ``set_index + 1``. Adding the bias gives exactly ``MASKED`` at a forbidden token (any logit is far
    below half an ulp of ``MASKED``, 1e31) and leaves the others unchanged; it is 2x faster than
    ``masked_fill_`` with a gathered bool mask on a CPU (256 x 32000: 12 against 27 ms on one core)."""

    bias: torch.Tensor
    last: torch.Tensor

    @staticmethod
    def of(table: torch.Tensor, device) -> Mask:
        """From ``table [S, V]`` bool (True = allowed, every row non-empty)."""
        table = table.to(device)
        vocab = table.shape[1]
        bias = torch.zeros(table.shape[0] + 1, vocab, device=device)  # [S+1, V]
        bias[1:].masked_fill_(~table, MASKED)
        top = vocab - 1 - table.flip(1).to(torch.uint8).argmax(1)  # [S] highest allowed id
        last = torch.cat([torch.tensor([vocab - 1], device=device), top])  # [S+1]
        return Mask(bias, last)

    def apply(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Mask ``z [..., V]`` in place for mask rows ``rows [...]`` (``set_index + 1``); -> ``last [...]``."""
        z.add_(self.bias.index_select(0, rows.reshape(-1)).view(z.shape))  # gathers [..., V] fp32
        return self.last[rows]


def per_row(temperature: float | torch.Tensor, n: int) -> float | torch.Tensor:
    """A temperature for every row: a number, or ``[n]`` values (float64) as an fp32 ``[n, 1]`` tensor.

    Rows of one pass may be at different steps of their schedules (``dgemma.core``). A per-row value is
    rounded to fp32 once, as PyTorch rounds a Python number it divides or multiplies an fp32 tensor by, so a
    row's results do not depend on whether its batch shares one temperature.
    """
    if not isinstance(temperature, torch.Tensor):
        return temperature
    return temperature.to(torch.float64).reshape(n, 1)


def step_reference(model, h: torch.Tensor, temperature: float | torch.Tensor, u: torch.Tensor,
                   soft: bool = True, set_index: torch.Tensor | None = None,
                   table: torch.Tensor | None = None) -> StepStats:
    """Full-logits path: ``h [n, C, d]``, ``temperature`` a number or ``[n]``, ``u [n, C]`` -> :class:`StepStats`;
    ``set_index [n, C]`` / ``table [S, V]``: the allowed-token mask (module docstring)."""
    t = per_row(temperature, h.shape[0])
    if isinstance(t, torch.Tensor):
        t = t.float().to(h.device)[:, :, None]  # [n, 1, 1]
    z = model.logits(h) / t  # [n, C, V] fp32
    last = [None] * z.shape[0]
    if set_index is not None:
        last = Mask.of(table, z.device).apply(z, (set_index + 1).to(z.device))  # [n, C]
    logp = torch.log_softmax(z, dim=-1)
    sampled = torch.stack([sample_inverse_cdf(logp[i].exp(), u[i], last[i]) for i in range(z.shape[0])])
    return StepStats(
        entropy=token_entropy(logp),
        argmax=z.argmax(-1),
        sampled=sampled,
        soft=model.soft_embedding(z.to(model.dtype)) if soft else None,
    )


@torch.no_grad()
def tempered_logits(x: torch.Tensor, embedding, cap: float | None, temperature: float | torch.Tensor,
                    block: int | None = None) -> torch.Tensor:
    """``[m, V]`` fp32 ``softcap(x @ E.T) / temperature`` for ``x [m, d]`` and the tied embedding ``E [V, d]``
    (the model's ``embed_tokens``, a :class:`~dgemma.model.layers.TiedEmbedding`); ``temperature`` is a
    number or float64 ``[m, 1]`` (one per row, see :func:`per_row`).

    The soft-cap ``cap * tanh(z / cap)`` is computed as ``2 cap sigmoid(2 z / cap) - cap``: the same
    function (rounding aside: an absolute error of about ``cap * eps / T``), and PyTorch's CPU sigmoid is
    3.5x faster than its tanh (5.9 against 20.5 ms over 256 x 32000 values on 2 cores). With ``block``
    the product is written ``block`` vocabulary columns at a time, each followed by its element-wise work,
    so that the weight's block and the output's block stay in cache: on a 2-core CPU that took the
    ``[256, 512] x [512, 32000]`` product from 89 to 70 ms (bitwise the same products there; in general
    the GEMM may pick other kernels for other widths, which round differently). For sampling only: no
    autograd graph (the blocks are written in place).
    """
    m, vocab = x.shape[0], embedding.num_embeddings
    block = block or vocab
    z = torch.empty(m, vocab, device=x.device)
    if cap is None:
        scale = temperature.float().to(x.device) if isinstance(temperature, torch.Tensor) else temperature
    elif isinstance(temperature, torch.Tensor):  # the factors in float64, rounded once (as a Python number is)
        scale, shift = (2.0 * cap / temperature).float().to(x.device), (cap / temperature).float().to(x.device)
    else:
        scale, shift = 2.0 * cap / temperature, cap / temperature
    for lo in range(0, vocab, block):
        part = z[:, lo:lo + block]  # [m, b] view, row stride V
        embedding.logits_block(x, lo, min(lo + block, vocab), out=part)
        if cap is None:
            part.div_(scale)
        else:
            part.mul_(2.0 / cap).sigmoid_().mul_(scale).sub_(shift)
    return z


def entropy_from_softmax(p: torch.Tensor, z: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Entropy ``[m]`` of ``p = softmax(z)`` (``[m, V]``, argmax ``top [m, 1]``), without log-probabilities.

    ``log p_i = (z_i - z_max) - log S`` and ``p_max = 1 / S``, so ``H = sum_i p_i (z_max - z_i) - log p_max``.
    Every term is non-negative (no cancellation for peaked rows), and it spares ``log_softmax``'s pass over
    ``[m, V]`` and its buffer. Overwrites ``z`` with ``z_max - z``.
    """
    p_top = p.gather(1, top)  # [m, 1]
    torch.sub(z.gather(1, top), z, out=z)
    return (p.unsqueeze(1) @ z.unsqueeze(2)).view(-1) - torch.log(p_top).view(-1)


def vocab_block(embedding) -> int | None:
    """Columns per block of :func:`tempered_logits` on this device: about 4 MB of the weight on a CPU
    (2048 rows at d = 512 in fp32; 1024 and 2048 measured alike, 3200 and 4096 slower), None (one block)
    on a GPU, whose GEMM kernels tile for their own caches."""
    if embedding.device.type != "cpu":
        return None
    return max(64, (4 << 20) // embedding.row_bytes // 64 * 64)


@torch.no_grad()
def step_fused(model, h: torch.Tensor, temperature: float | torch.Tensor, u: torch.Tensor, soft: bool = True,
               chunk_bytes: int | None = None, block: int | None = None, set_index: torch.Tensor | None = None,
               table: torch.Tensor | None = None) -> StepStats:
    """Chunked path with the same results as :func:`step_reference` (up to float rounding). Sampling is
    never differentiated: no autograd graph is built, even when the caller's mode would build one.
    ``temperature``: a number, or ``[n]`` (one per row). ``set_index [n, C]`` / ``table [S, V]``: the
    allowed-token mask (module docstring), applied chunk by chunk.

    ``block``: vocabulary columns per LM-head block (default :func:`vocab_block`).
    """
    n, c, d = h.shape
    vocab, embedding = model.cfg.vocab_size, model.embed_tokens  # tied LM head / embedding [V, d]
    cap = model.cfg.final_logit_softcapping
    budget = chunk_bytes or CHUNK_BYTES.get(h.device.type, CHUNK_BYTES["cuda"])
    m = max(1, budget // (4 * vocab)) if chunk_bytes else max(MIN_CHUNK_ROWS, budget // (4 * vocab))
    block = block or vocab_block(embedding)
    flat, u = h.reshape(n * c, d), u.reshape(n * c).to(h.device)
    temps = per_row(temperature, n)
    if isinstance(temps, torch.Tensor):
        temps = temps.expand(n, c).reshape(n * c, 1)  # [n*C, 1] float64
    entropy = torch.empty(n * c, device=h.device)
    argmax = torch.empty(n * c, dtype=torch.long, device=h.device)
    sampled = torch.empty(n * c, dtype=torch.long, device=h.device)
    out_soft = torch.empty(n * c, d, dtype=model.dtype, device=h.device) if soft else None
    scale = model.embed_scale()
    mask = rows = None
    if set_index is not None:
        mask, idx = Mask.of(table, h.device), set_index.reshape(n * c).cpu()  # [n*C] on the host
        rows = (idx + 1).to(h.device)  # [n*C] mask rows
    for lo in range(0, n * c, m):
        hi = min(lo + m, n * c)
        t = temps[lo:hi] if isinstance(temps, torch.Tensor) else temps
        z = tempered_logits(flat[lo:hi], embedding, cap, t, block)  # [m, V] fp32
        last = None
        if mask is not None and bool((idx[lo:hi] >= 0).any()):  # a host check: no sync
            last = mask.apply(z, rows[lo:hi])  # [m]
        top = z.argmax(-1, keepdim=True)  # [m, 1]
        argmax[lo:hi] = top.view(-1)
        # softmax's own kernel, not exp(z - logsumexp): exp of inputs below -87 (results under FLT_MIN)
        # takes a 10x slower path on x86, and most of a peaked row is down there; softmax's kernel does not
        # (a 2-core CPU, vocab 32000: 8.5 ms against 35 ms per 256 rows).
        p = torch.softmax(z, dim=-1)
        sampled[lo:hi] = sample_inverse_cdf(p, u[lo:hi], last)
        if soft:
            # The reference feeds back the logits in the model dtype; in fp32 that is p itself.
            q = p if model.dtype == torch.float32 else F.softmax(z.to(model.dtype), -1, dtype=torch.float32)
            out_soft[lo:hi] = embedding.soft_embed(q.to(model.dtype)) * scale
        entropy[lo:hi] = entropy_from_softmax(p, z, top)  # last: it overwrites z
    return StepStats(
        entropy=entropy.view(n, c), argmax=argmax.view(n, c), sampled=sampled.view(n, c),
        soft=out_soft.view(n, c, d) if soft else None,
    )
