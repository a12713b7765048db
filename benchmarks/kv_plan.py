"""How many concurrent requests fit on a GPU: the serving memory plan, computed from a config.

    python benchmarks/kv_plan.py --preset 26b-a4b --context 4096 --gpu-gb 80 141 --out docs/bench/kv-plan-26b.json

Computed, not measured. Per request the engine core's KV pool holds one slot of ``context`` positions on
every layer (``dgemma.core.pool``); a decoder pass over N requests holds activations for N canvases at
once. The activation cost per token is taken from a measured batch-1 run of the same config (its peak
memory minus weights and KV, over the prompt it prefilled: ``--measured``, a ``dgemma bench`` JSON), so
the plan is only as good as that proxy. The encoder's working set is bounded by the token budget per step
(``--batched-tokens``) and the sampler's by its chunk (512 MiB of logits on CUDA). Also printed: the same
plan if sliding-window layers kept only their last ``W - 1`` positions (not implemented).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dgemma.bench.presets import preset_config
from dgemma.core.pool import token_bytes
from dgemma.denoise import CHUNK_BYTES

GB = 1e9


def plan(preset: str, context: int, gpu_gb: list[float], batched_tokens: int, measured: dict,
         dtype: torch.dtype = torch.bfloat16) -> dict:
    cfg = preset_config(preset)
    size = torch.empty((), dtype=dtype).element_size()
    per_token = token_bytes(cfg, dtype)
    sliding = sum(2 * s.num_kv_heads * s.head_dim * size for s in cfg.layers if s.is_sliding)
    weights = measured["parameters"] * size
    run = measured["runs"][0]
    prompt = measured["spec"]["prompt_len"]
    kv_run = (prompt + cfg.canvas_length) * per_token
    act_per_token = max(0.0, (run["peak_mem_bytes"] - weights - kv_run) / prompt)
    slot = context * per_token
    slot_windowed = context * (per_token - sliding) + min(context, cfg.sliding_window - 1) * sliding
    per_request_act = cfg.canvas_length * act_per_token  # one canvas in the decoder pass
    fixed = weights + batched_tokens * act_per_token + CHUNK_BYTES["cuda"]
    out = {"preset": preset, "dtype": str(dtype).removeprefix("torch."), "context": context,
           "kv_bytes_per_token": per_token, "kv_bytes_per_token_sliding_layers": sliding,
           "weights_bytes": weights, "activation_bytes_per_token (measured proxy)": act_per_token,
           "slot_bytes": slot, "decoder_activation_bytes_per_request": per_request_act,
           "fixed_bytes (weights + encoder budget + sampler chunk)": fixed, "gpus": []}
    for gb in gpu_gb:
        free = gb * GB - fixed
        out["gpus"].append({
            "gpu_gb": gb,
            "requests (slot pool, as implemented)": int(free // (slot + per_request_act)),
            "requests (if sliding layers kept only W-1 positions)": int(free // (slot_windowed + per_request_act)),
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="26b-a4b")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--gpu-gb", type=float, nargs="+", default=[80, 141])
    ap.add_argument("--batched-tokens", type=int, default=2048)
    ap.add_argument("--measured", default="docs/bench/26b-a4b-gpu-batch.json")
    ap.add_argument("--out")
    args = ap.parse_args()
    measured = json.loads(Path(args.measured).read_text())
    result = plan(args.preset, args.context, args.gpu_gb, args.batched_tokens, measured)
    result["measured_from"] = args.measured
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
