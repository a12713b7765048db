"""Memory of one QLoRA training step, from the config: an int4 base, LoRA adapters (experts included) in fp32,
AdamW, activation checkpointing. Prints a table and writes JSON (default docs/bench/qlora-memory-26b.json).

The step: one example of ``S = prompt + canvas`` tokens through the encoder (causal, AR loss on S - 1 pairs) and
one ``C``-token canvas through the decoder (diffusion loss), compute dtype ``b`` bytes (bf16 on a GPU: 2), the
defaults of ``dgemma.train.config`` (LoRA rank 16 on attention q/k/v/o and the dense MLP, ``lora.experts``,
``objective.loss_chunk_rows`` 2048). The terms (bytes):

1. ``weights``: the base as stored, ``dgemma.quant.accounting.total_bytes(cfg, "int4", "bfloat16", 64)``: int4
   codes and bf16 scales of every linear and expert tensor, the embedding, norms and router in bf16.
2. ``adapters``: the LoRA parameters in fp32 (4 B): ``r * (in + out)`` per adapted linear (the shapes of the
   model's own modules), and for each expert tensor ``W [E, out, in]`` peft's ``A [r * E, in]`` + ``B [out, r * E]``.
3. ``gradients``: one fp32 gradient per adapter parameter (4 B); the frozen base has none.
4. ``adamw``: ``exp_avg`` and ``exp_avg_sq`` in fp32 (8 B per adapter parameter).
5. ``boundaries``: what activation checkpointing keeps through the step: each layer's input, ``L * (S + C) * d * b``,
   the final-norm outputs (``(S + C) * d * b``), and the encoder's K/V of every layer, which the decoder reads
   (``TrainEncoderKV``), with their gradients: ``2 * sum_l 2 * kv_l * hd_l * S * b``.
6. ``layer_recompute``: the backward pass of one layer recomputes its forward and keeps what autograd saves
   (:func:`layer_saved`, per token, enumerated op by op: the fp32 copies the norms make, the projections'
   outputs, each LoRA layer's input, the attention inputs and output, the dense MLP's four ``[T, dense]``
   tensors, the experts' ``[N * k, .]`` rows (gathered input, gate/up output, activation, product, output), the
   router's probabilities), plus the two largest gradients alive with them; the largest layer, T = S; and the
   expert weights dequantised at once (CUDA's grouped GEMMs: runs of experts of at most 256 MiB,
   ``dgemma.quant.lora.DEQUANT_BYTES``; nothing dequantised is kept for the backward pass).
7. ``lm_head``: the checkpointed cross-entropy recomputes ``n = min(loss_chunk_rows, S - 1)`` rows of ``V``
   logits in the backward pass: the capped logits and the log-softmax (saved, fp32) and two fp32 gradients
   alive at once: ``16 * n * V``.

``total (sum)`` adds 5, 6 and 7 (an upper bound); 6 and 7 happen at different moments of the backward pass, so
``total (max of 6, 7)`` is the step's peak. Not counted: the CUDA context and the allocator's fragmentation.
``--measure`` checks terms 3, 5, 6 and 7 on a scaled-down config on the CPU (fp32 compute, b = 4): the heap in
use (glibc ``mallinfo2``: every torch CPU allocation) is read after each aten op of a second training step, and
its peak above the level before the step is compared with the prediction for that config, once with the LM
head's peak dominating and once (16-row chunks) the layer's recompute. The CPU runs grouped-query attention on
its math path, which also keeps the attention weights (``4 * H * S * S`` per layer; CUDA's memory-efficient
kernel keeps none), so the measurement there is expected ~1.6 MB above the recompute prediction.

    python benchmarks/qlora_memory.py --measure
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
from pathlib import Path

import torch

from dgemma.bench.presets import PRESETS, _config
from dgemma.config import FULL, SLIDING, ModelConfig
from dgemma.loading import meta_model
from dgemma.quant.lora import DEQUANT_BYTES
from dgemma.quant.accounting import total_bytes
from dgemma.train.config import LoraSection
from dgemma.train.objective import ObjectiveConfig

GB = 1e9


def lora_parameters(cfg: ModelConfig, lora: LoraSection) -> dict[str, int]:
    """Adapter parameters: ``linears`` (the targeted ``nn.Linear`` modules of the model) and ``experts``."""
    model = meta_model(cfg)
    linears = sum(lora.rank * (m.in_features + m.out_features) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and any(re.fullmatch(t, name) for t in lora.targets))
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    per_layer = lora.rank * e * ((d + 2 * i) + (i + d))  # gate_up [E, 2I, d] and down [E, d, I]
    return {"linears": linears, "experts": per_layer * cfg.num_hidden_layers if lora.experts else 0}


def layer_saved(cfg: ModelConfig, spec, t: int, b: int, rank: int) -> int:
    """Bytes autograd keeps for one recomputed layer of ``t`` tokens (compute dtype ``b`` bytes), plus the two
    largest gradients alive with them. bf16: each norm saves an fp32 copy of its input and each peft LoRA
    linear a bf16 copy of its input (peft casts it to fp32, autocast back); fp32: both share the tensor."""
    d, dm, f = cfg.hidden_size, cfg.intermediate_size, 4
    h, kv, hd, k, i, e = (cfg.num_attention_heads, spec.num_kv_heads, spec.head_dim, cfg.top_k_experts,
                          cfg.moe_intermediate_size, cfg.num_experts)
    half = b != 4
    norm = f * d if half else b * d  # a weighted norm's saved input: an fp32 copy, or the (fresh) input itself
    q, kvw = h * hd, kv * hd
    attn = (norm + (3 if half else 1) * b * d  # input norm; the input of the q/k/v LoRA layers
            + (f if half else b) * (q + 2 * kvw)  # q / k / v norms (full layers: v is the raw k, normed apart)
            + b * (q + 2 * kvw) + b * q + f * h  # the attention's q, k, v and output, its log-sum-exp
            + b * q + norm)  # o_proj's input, the post-attention norm
    dense = norm + (2 if half else 1) * b * d + 4 * b * dm + norm  # pre norm, LoRA inputs, 4 x [t, dense], post
    router = norm + b * d + f * e  # its norm, the projection's input, the probabilities
    experts = (norm + k * b * d  # pre norm, the gathered rows (every expert's LoRA input)
               + k * b * (2 * i + i + i)  # gate/up output, the activation, the product
               + k * b * d + k * f  # output rows and their routing weights
               + 2 * k * b * rank  # the adapters' rank-r rows
               + norm + norm)  # the two post norms
    transient = k * b * (2 * i + d)  # gradients of the gate/up output and of the gathered rows
    return t * (attn + dense + router + experts + transient + 4 * rank * b)


def dequantized_experts(cfg: ModelConfig, b: int, grouped: bool) -> int:
    """The dequantised expert weights alive at once: on the grouped path (CUDA) a run of experts of the larger
    tensor (at most ``dgemma.quant.lora.DEQUANT_BYTES``), expert by expert elsewhere."""
    per_expert = 2 * cfg.moe_intermediate_size * cfg.hidden_size * b
    return min(cfg.num_experts, max(1, DEQUANT_BYTES // per_expert)) * per_expert if grouped else per_expert


def step_memory(cfg: ModelConfig, prompt: int, lora: LoraSection, objective: ObjectiveConfig, b: int = 2,
                quant: str = "int4", group_size: int = 64, grouped: bool = True) -> dict[str, int]:
    """The seven terms of the module docstring, in bytes (``grouped``: CUDA's grouped expert GEMMs)."""
    c = cfg.canvas_length
    s = prompt + c
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    params = lora_parameters(cfg, lora)
    n = params["linears"] + params["experts"]
    kv = sum(2 * spec.num_kv_heads * spec.head_dim * s * b for spec in cfg.layers)
    rows = min(objective.loss_chunk_rows, s - 1)
    return {
        "weights": total_bytes(cfg, quant, "bfloat16", group_size),
        "adapters": 4 * n,
        "gradients": 4 * n,
        "adamw": 8 * n,
        "boundaries": n_layers * (s + c) * d * b + (s + c) * d * b + 2 * kv,
        "layer_recompute": (max(layer_saved(cfg, spec, s, b, lora.rank) for spec in cfg.layers)
                            + dequantized_experts(cfg, b, grouped)),
        "lm_head": 16 * rows * cfg.vocab_size,
    }


def peak_terms(terms: dict[str, int], kept: tuple[str, ...]) -> int:
    """``kept`` terms plus the larger of the two backward-pass peaks (they do not coincide)."""
    return sum(terms[k] for k in kept) + max(terms["layer_recompute"], terms["lm_head"])


KEPT = ("weights", "adapters", "gradients", "adamw", "boundaries")


def table(terms: dict[str, int]) -> str:
    lines = [f"{'term':<18}{'GB':>9}"] + [f"{k:<18}{v / GB:>9.3f}" for k, v in terms.items()]
    return "\n".join(lines + [f"{'total (sum)':<18}{sum(terms.values()) / GB:>9.3f}",
                              f"{'total (max of 6, 7)':<18}{peak_terms(terms, KEPT) / GB:>9.3f}"])


# ---------------------------------------------------------------------------------------------- measurement
def scaled_config() -> dict:
    """The 26B-A4B layout (5 sliding + 1 full layer, GQA, MoE top-k) at a CPU-sized width."""
    return _config(64, vocab=8192, hidden=256, dense=192, moe=64, experts=16, top_k=4, heads=4, kv=2, head_dim=64,
                   full_kv=1, full_head_dim=128, pattern=[SLIDING] * 5 + [FULL], repeats=1, window=128, max_pos=4096)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def measure(prompt: int, lora: LoraSection, objective: ObjectiveConfig) -> dict[str, int]:
    """Peak heap above the level before a second training step (weights, adapters, AdamW states allocated)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dgemma.loading import build_model
    from dgemma.quant.apply import quantize_model
    from dgemma.train import lora as train_lora
    from dgemma.train.data import Example, collate
    from dgemma.train.objective import Draw, Objective

    cfg = ModelConfig.from_hf_dict(scaled_config())
    model = quantize_model(build_model(cfg, device="cpu", dtype=torch.float32, seed=0), "int4", 64)
    net = train_lora.apply(model, lora, None)
    obj = Objective(net, objective, checkpoint=True)
    params = [p for p in obj.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    c = cfg.canvas_length
    ids = torch.randint(3, cfg.vocab_size, (prompt + c,), generator=g).tolist()
    batch = collate([Example(tuple(ids), prompt, c)], 0)
    draws = [Draw(0.5, 0, torch.rand(c, generator=g) < 0.5, torch.randint(0, cfg.vocab_size, (c,), generator=g),
                  True)]

    class Peak(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Peak.peak = max(Peak.peak, heap_in_use())
            return out

    for step in range(2):
        base = heap_in_use()
        Peak.peak = base
        with Peak():
            diff, ar = obj(batch, draws)
            (diff + ar).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    predicted = step_memory(cfg, prompt, lora, objective, b=4, grouped=False)
    keys = ("gradients", "boundaries", "layer_recompute", "lm_head")
    return {"loss_chunk_rows": objective.loss_chunk_rows, "measured": Peak.peak - base,
            "predicted_sum": sum(predicted[k] for k in keys), "predicted_max": peak_terms(predicted, keys[:2]),
            **{f"predicted_{k}": predicted[k] for k in keys}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens (the canvas is the config's, 256)")
    ap.add_argument("--json", default="docs/bench/qlora-memory-26b.json")
    ap.add_argument("--measure", action="store_true", help="also check the formula on a scaled config (CPU)")
    ap.add_argument("--measure-prompt", type=int, default=256)
    args = ap.parse_args()
    cfg = ModelConfig.from_hf_dict(PRESETS["26b-a4b"]())
    lora, objective = LoraSection(enabled=True, experts=True), ObjectiveConfig()
    out = {"config": "26b-a4b", "prompt": args.prompt, "canvas": cfg.canvas_length, "batch": 1, "quant": "int4",
           "group_size": 64, "lora_rank": lora.rank, "lora_experts": lora.experts,
           "adapter_parameters": lora_parameters(cfg, lora), "loss_chunk_rows": objective.loss_chunk_rows,
           "compute_dtype": "bfloat16", "target_bytes": 24 * 10**9}
    small_head = ObjectiveConfig(loss_chunk_rows=128)
    variants = {"default": (lora, objective),
                "loss_chunk_rows=128": (lora, small_head),
                "rank 8, loss_chunk_rows=128": (LoraSection(enabled=True, rank=8, experts=True), small_head),
                "no expert LoRA": (LoraSection(enabled=True), objective),
                "no expert LoRA, loss_chunk_rows=128": (LoraSection(enabled=True), small_head)}
    out["variants"] = {}
    for name, (lo, ob) in variants.items():
        terms = step_memory(cfg, args.prompt, lo, ob)
        out["variants"][name] = {"terms": terms, "total": sum(terms.values()),
                                 "total_max_of_backward_peaks": peak_terms(terms, KEPT)}
        print(f"26b-a4b, {name}: int4 base, LoRA rank {lo.rank}{' + experts' if lo.experts else ''}, "
              f"S = {args.prompt} + {cfg.canvas_length}, loss_chunk_rows {ob.loss_chunk_rows}\n{table(terms)}\n")
    if args.measure:  # the LM head's peak, then (16-row chunks) the layer's recompute peak, dominating
        out["measured_scaled_cpu"] = {"config": scaled_config()["text_config"], "prompt": args.measure_prompt,
                                      "compute_dtype": "float32", "runs": []}
        print("scaled config on the CPU (fp32), one step's peak above its starting heap, MB:")
        for rows in (objective.loss_chunk_rows, 16):
            m = measure(args.measure_prompt, lora, ObjectiveConfig(loss_chunk_rows=rows))
            out["measured_scaled_cpu"]["runs"].append(m)
            print("  " + ", ".join(f"{k} {v / 1e6:.2f}" if k != "loss_chunk_rows" else f"{k} {v}"
                                   for k, v in m.items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
