#!/usr/bin/env bash
# Issue 3, section 3: the full 26B-A4B config with random bf16 weights on one GPU (H100 / H200).
# Needs torch with CUDA and transformers 5.23 installed (pip install -e ".[bench]"); writes JSON + PNG here.
#
# 1. batch 1, 4096-token prompt, 512 new tokens, 16 fixed steps: dgemma vs transformers vs AR,
#    ms per step and per canvas, and the bandwidth floor of a step (floor_ms) from the measured copy rate;
# 2. the largest power-of-two batch whose prefill plus one canvas fits (transformers and AR skipped).
# The 26B weights (52 GB in bf16) are allocated once, directly on the GPU; transformers shares them.
set -euo pipefail
out="${1:-.}"
python -m dgemma bench --preset 26b-a4b --device cuda --dtype bfloat16 --prompt-len 4096 --new-tokens 512 \
    --steps 16 --batch 1 --json "$out/26b-a4b-gpu.json" --plot "$out/26b-a4b-gpu.png"
python -m dgemma bench --preset 26b-a4b --device cuda --dtype bfloat16 --prompt-len 4096 --new-tokens 256 \
    --steps 16 --batch 1 --no-transformers --no-ar --batch-search 512 --json "$out/26b-a4b-gpu-batch.json"
