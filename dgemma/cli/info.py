"""``dgemma info MODEL``: what a checkpoint is, read from its configs alone (no weights are loaded, and a
Hub id fetches only config.json and generation_config.json)."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameter counts, memory per dtype and generation defaults")
    p.add_argument("model", nargs="?", help="checkpoint directory or Hugging Face repo id (default: the embedded model)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quant", choices=("int8", "int4"), help="also print the weights' bytes per part in this format")
    p.add_argument("--quant-embedding", choices=("bfloat16", "int8"), default="bfloat16",
                   help="the tied embedding in the quantised formats (default: bfloat16)")


def summary(source: str, embedding: str = "bfloat16") -> dict:
    """``embedding``: how the quantised formats store the tied embedding (``bfloat16`` or ``int8``)."""
    from dgemma import loading
    from dgemma.model.moe import Experts
    from dgemma.params import SamplingParams
    from dgemma.quant import accounting
    from dgemma.quant import checkpoint as qcheckpoint

    ckpt = loading.resolve_source(source, configs_only=True)
    cfg = loading.read_config(ckpt)
    model = loading.meta_model(cfg)  # shapes only, no storage
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    active = total - experts + experts * cfg.top_k_experts // max(1, cfg.num_experts)
    gen = loading.read_generation_config(ckpt)
    try:  # written by dgemma quantize
        stored = qcheckpoint.read_section(loading.read_json(ckpt / "config.json"))
    except ValueError as e:
        raise ValueError(f"{ckpt / 'config.json'}: {e}") from None
    defaults = SamplingParams.from_generation_config(gen)
    sliding = sum(1 for spec in cfg.layers if spec.is_sliding)
    return {
        "checkpoint": str(ckpt),
        "architecture": {
            "layers": len(cfg.layers), "sliding_layers": sliding, "full_layers": len(cfg.layers) - sliding,
            "hidden_size": cfg.hidden_size, "attention_heads": cfg.num_attention_heads,
            "sliding_window": cfg.sliding_window, "experts": cfg.num_experts, "experts_per_token": cfg.top_k_experts,
            "expert_width": cfg.moe_intermediate_size, "dense_mlp_width": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size, "canvas_length": cfg.canvas_length,
            "context": cfg.max_position_embeddings,
        },
        "parameters": {"total": total, "active_per_token": active, "experts": experts},
        "bytes": {fmt: accounting.total_bytes(cfg, fmt, embedding) for fmt in accounting.FORMATS},
        "bytes_by_part": {fmt: accounting.bytes_by_part(cfg, fmt, embedding) for fmt in accounting.FORMATS},
        "quantization": {"int8": "per output channel, symmetric", "int4": f"groups of {accounting.default_group_size(cfg)}, "
                         "symmetric, packed two per byte", "scales": "bfloat16", "embedding": embedding,
                         "kept": "norms, layer scalars and router in bfloat16"},
        "stored_quantized": None if stored is None else {
            **stored.as_dict(), "dtype": loading.stored_dtype(ckpt).__repr__().removeprefix("torch."),
            "bytes_with_bf16_float_parts": accounting.total_bytes(cfg, stored.scheme, stored.embedding,
                                                                  stored.group_size)},
        "generation_defaults": {k: v for k, v in defaults.__dict__.items() if v is not None},
    }


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()


def run(parser, args) -> int:
    from dgemma.embedded import default_model

    info = summary(args.model or str(default_model()), args.quant_embedding)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    a, p = info["architecture"], info["parameters"]
    print(f"checkpoint   {info['checkpoint']}")
    print(f"layers       {a['layers']} ({a['sliding_layers']} sliding, window {a['sliding_window']}; "
          f"{a['full_layers']} full), hidden {a['hidden_size']}, {a['attention_heads']} heads")
    print(f"experts      {a['experts']} of width {a['expert_width']}, {a['experts_per_token']} per token; "
          f"dense MLP {a['dense_mlp_width']}")
    print(f"vocabulary   {a['vocab_size']}; canvas {a['canvas_length']} tokens; context {a['context']}")
    print(f"parameters   {_human(p['total'])} total, {_human(p['active_per_token'])} active per token "
          f"({_human(p['experts'])} in experts)")
    q = info["quantization"]
    print("memory       " + ", ".join(f"{k} {_human(v, 'B')}" for k, v in info["bytes"].items())
          + f" (weights; int8 and int4 with their {q['scales']} scales, embedding {q['embedding']})")
    if info["stored_quantized"]:
        sq = info["stored_quantized"]
        print(f"stored       quantised {sq['scheme']} (group size {sq['group_size']}, embedding {sq['embedding']}, "
              f"float parts {sq['dtype']}): {_human(sq['bytes_with_bf16_float_parts'], 'B')} of weights with "
              "bfloat16 float parts")
    if args.quant:
        parts = info["bytes_by_part"][args.quant]
        total = info["bytes"][args.quant]
        print(f"{args.quant} parts   ({q[args.quant]}; {q['kept']})")
        for part, n in parts.items():
            print(f"  {part:<18} {n:>16,} B  {_human(n, 'B'):>10}  {100 * n / total:5.1f}%")
        print(f"  {'total':<18} {total:>16,} B  {_human(total, 'B'):>10}")
    print("defaults     " + ", ".join(f"{k}={v}" for k, v in info["generation_defaults"].items()))
    return 0
