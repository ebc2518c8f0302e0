#!/usr/bin/env bash
# The GPU check: runs on a Linux GPU machine without a Rust toolchain, from binaries built elsewhere
# (see docs/backends.md, "GPU check"). Usage: scripts/gpu-check.sh BIN_DIR
#   BIN_DIR holds `odpo` and the `parity` / `parity_neo` test binaries of odpo-model, all built with
#   `--features flex,vulkan`, and `smollm2-config.json` (SmolLM2-135M's config.json: shapes only).
# It prints the GPU, runs the model parity fixtures on the GPU (logits against transformers within
# 1e-4), then forward throughput on SmolLM2-135M shapes on wgpu/Vulkan and on this machine's CPU (flex),
# and PyTorch on the same GPU when torch + transformers are installed.
set -u
BIN=${1:?usage: scripts/gpu-check.sh BIN_DIR}
cd "$(dirname "$0")/.."
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>/dev/null | head
nproc

echo "== parity on the GPU (wgpu/Vulkan is the default device of a flex+vulkan build)"
for t in parity parity_neo; do
  BURN_DEVICE=${BURN_DEVICE:-} timeout 300 "$BIN/$t" --test-threads=1 --nocapture --skip half_precision 2>&1 | grep -E "max|test result|panicked|error" | head -20
done

echo "== forward throughput, SmolLM2-135M shapes, 8 x 128"
timeout 200 "$BIN/odpo" bench-forward --config "$BIN/smollm2-config.json" --backend vulkan --batch 8 --seq 128 --repeats 10 2>&1 | tail -2
timeout 200 "$BIN/odpo" bench-forward --config "$BIN/smollm2-config.json" --backend flex --batch 8 --seq 128 --repeats 3 2>&1 | tail -2

echo "== PyTorch on the same GPU"
if python3 -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null; then
  timeout 200 python3 bench/pytorch/forward.py --device cuda --config "$BIN/smollm2-config.json" --repeats 10 --threads 16
else
  echo "torch with CUDA + transformers not installed here: no PyTorch figure"
fi
