#!/usr/bin/env bash
# The GPU check: the full 26B-A4B config with random bf16 weights on one GPU (H100 / H200).
# Needs torch with CUDA and transformers 5.23 (pip install -e ".[bench]"); writes JSON, PNG and logs to $1.
#
# 0. the CUDA tests of the suite (tests/test_graphs.py, tests/test_layers.py: graphs give the eager tokens);
# 00. CUDA graphs against eager decoding on the 26B-A4B config itself (bf16): one pass compared bitwise and
#     generation compared token by token, with and without deterministic algorithms (gpu_graphs_check.py);
# 0a. preflight: the grouped-GEMM expert path against the per-expert loop on this GPU, in bf16;
# 0b. CUDA graphs against eager decoding, and eager against itself, pass by pass and token by token, on a
#     small random model in bf16 and fp32 (gpu_graphs_check.py);
# 0c. the attention of the decoder and encoder passes, SDPA's grouped mode against plain (gpu_attention.py);
# 1. batch 1, 4096-token prompt, 512 new tokens, 16 fixed steps: dgemma (eager and with CUDA graphs) vs
#    transformers vs AR, ms per step and per canvas, and the bandwidth floor of a step (floor_ms) from the
#    measured copy rate;
# 2. where a decoder pass spends its time, eager and replayed from a CUDA graph (gpu_profile.py);
# 2b. where a whole canvas spends its time with graphs on (gpu_step_profile.py);
# 2c. with BASE_DENOISE=FILE (written here by `git show REV:dgemma/denoise.py > FILE` inside the tree, as the
#     machine gets the tree without .git): the fused step of that revision against now (step_ab.py);
# 2d. with QUANT=1: bf16, int8 and int4 weights, ms per step against each format's bandwidth floor (gpu_quant.py);
# with FULL=1 also (measured 2026-11-26, unchanged since):
# 3. the same dgemma run with the per-expert loop instead of the grouped GEMM (what the GEMM is worth);
# 4. the largest power-of-two batch whose prefill plus one canvas fits (transformers and AR skipped).
# The 26B weights (52 GB in bf16) are allocated directly on the GPU; transformers shares them.
# Each stage has its own time limit, so a slow or failing stage leaves the others' figures. About 8-9 minutes.
set -uo pipefail
out="${1:-.}"
py="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 90 $py -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_layers.py 2>&1 | tee "$out/pytest.log"
CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 240 $py benchmarks/gpu_graphs_check.py --preset 26b-a4b --dtypes bfloat16 \
    2>&1 | tee "$out/graphs-check-26b.log"
$py - <<'EOF'
import torch
from dgemma.model.moe import Experts
from dgemma.config import ModelConfig
from dgemma.bench.presets import preset_config
cfg = preset_config("26b-a4b")
print("torch", torch.__version__, torch.cuda.get_device_name())
torch.manual_seed(0)
ex = Experts(cfg).to("cuda", torch.bfloat16)
for p in ex.parameters():
    torch.nn.init.normal_(p, std=0.02)
x = torch.randn(2048, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
idx = torch.stack([torch.randperm(cfg.num_experts, device="cuda")[: cfg.top_k_experts] for _ in range(2048)])
w = torch.rand(2048, cfg.top_k_experts, device="cuda").softmax(-1)
ex.grouped = False
loop = ex(x, w, idx).float()
ex.grouped = True
grouped = ex(x, w, idx).float()
print("grouped vs loop, relative error:", ((grouped - loop).norm() / loop.norm()).item())
for mode in (False, True):
    ex.grouped = mode
    for _ in range(3):
        ex(x, w, idx)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        ex(x, w, idx)
    b.record()
    torch.cuda.synchronize()
    print(f"experts of one layer, 256x8 token-slots: {'grouped' if mode else 'loop'} {a.elapsed_time(b) / 10:.2f} ms")
EOF
CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 90 $py benchmarks/gpu_graphs_check.py 2>&1 | tee "$out/graphs-check.log"
timeout 60 $py benchmarks/gpu_attention.py 2>&1 | tee "$out/attention.log"
common=(--preset 26b-a4b --device cuda --dtype bfloat16 --prompt-len 4096 --steps 16 --batch 1)
timeout 300 $py -m dgemma bench "${common[@]}" --new-tokens 512 --cuda-graphs \
    --json "$out/26b-a4b-gpu.json" --plot "$out/26b-a4b-gpu.png" 2>&1 | tee "$out/bench.log" | grep -v "Loading weights"
timeout 90 $py benchmarks/gpu_profile.py 2>&1 | tee "$out/profile.log"
timeout 100 $py benchmarks/gpu_step_profile.py 2>&1 | tee "$out/step-profile.log"
if [ -n "${BASE_DENOISE:-}" ]; then
    timeout 120 $py benchmarks/step_ab.py --base "$BASE_DENOISE" --preset 26b-a4b --device cuda --dtype bfloat16 \
        --batch 1 4 --rounds 4 2>&1 | tee "$out/step-ab.log"
fi
if [ "${QUANT:-0}" = 1 ]; then  # quantised weights: bf16 / int8 / int4 ms per step against their floors
    timeout 300 $py benchmarks/gpu_quant.py --preset 26b-a4b --batch 1 4 --json "$out/gpu-quant-26b.json" \
        2>&1 | tee "$out/gpu-quant-26b.log"
fi
[ "${FULL:-0}" = 1 ] || exit 0
timeout 120 $py -m dgemma bench "${common[@]}" --new-tokens 256 --no-transformers --no-ar --moe loop \
    --json "$out/26b-a4b-gpu-loop.json" 2>&1 | tee "$out/bench-loop.log"
timeout 240 $py -m dgemma bench "${common[@]}" --new-tokens 256 --no-transformers --no-ar --batch-search 256 \
    --json "$out/26b-a4b-gpu-batch.json" 2>&1 | tee "$out/bench-batch.log"
