#!/usr/bin/env bash
# The GPU check: runs on a Linux GPU machine without a Rust toolchain, from binaries built elsewhere
# (docs/backends.md, "GPU check"). Usage: scripts/gpu-check.sh BIN_DIR
#   BIN_DIR holds `odpo` (or `odpo.gz`) built with `--features flex,vulkan`, optionally the `parity` and
#   `parity_neo` test binaries of odpo-model built the same way, and `smollm2-config.json`
#   (SmolLM2-135M's config.json: shapes only), and `libvulkan.so.1` if the machine lacks the Vulkan loader.
# It prints the GPU; computes completion log-probabilities of every tiny fixture model on wgpu/Vulkan
# and on the CPU (flex) and prints both; runs the parity test binaries on the GPU when present; measures
# forward throughput on SmolLM2-135M shapes on Vulkan and on the CPU; and PyTorch on the same GPU when
# torch with CUDA and transformers are installed.
set -u
BIN=${1:?usage: scripts/gpu-check.sh BIN_DIR}
cd "$(dirname "$0")/.."
[ -f "$BIN/odpo" ] || gunzip -k "$BIN/odpo.gz"
# A machine with the NVIDIA driver but no Vulkan loader: a `libvulkan.so.1` in BIN_DIR (Debian's
# libvulkan1) is used.
[ -f "$BIN/libvulkan.so.1" ] && export LD_LIBRARY_PATH="$PWD/$BIN:${LD_LIBRARY_PATH:-}"
chmod +x "$BIN/odpo"
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>/dev/null | head
echo "cpus: $(nproc)"

echo "== completion log-prob, GPU (vulkan) against CPU (flex), every fixture family"
TOK=crates/odpo-model/tests/fixtures/tokenizer/tiny
for case in gpt2 llama_gqa_untied llama3_rope qwen2_bias llama_sharded gpt_neo_local gptj gpt_neox_parallel gpt_neox_sequential; do
  m=crates/odpo-model/tests/fixtures/$case
  g=$(timeout 120 "$BIN/odpo" logprobs --model "$m" --tokenizer "$TOK" --prompt "hello world hello" --completion "world hello world world hello" --backend vulkan --json 2>/dev/null | grep completion_logprob_sum)
  c=$(timeout 120 "$BIN/odpo" logprobs --model "$m" --tokenizer "$TOK" --prompt "hello world hello" --completion "world hello world world hello" --backend flex --json 2>/dev/null | grep completion_logprob_sum)
  echo "$case | vulkan ${g:-FAILED} | flex ${c:-FAILED}"
done

for t in parity parity_neo; do
  [ -x "$BIN/$t" ] && timeout 300 "$BIN/$t" --test-threads=1 --nocapture --skip half_precision 2>&1 | grep -E "max|test result|panicked" | head -20
done

echo "== forward throughput, SmolLM2-135M shapes, 8 x 128, f32"
timeout 240 "$BIN/odpo" bench-forward --config "$BIN/smollm2-config.json" --backend vulkan --batch 8 --seq 128 --repeats 10 2>&1 | tail -3
timeout 200 "$BIN/odpo" bench-forward --config "$BIN/smollm2-config.json" --backend flex --batch 8 --seq 128 --repeats 3 2>&1 | tail -1

echo "== PyTorch on the same GPU"
if python3 -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null; then
  timeout 200 python3 bench/pytorch/forward.py --device cuda --config "$BIN/smollm2-config.json" --repeats 10 --threads 16
else
  echo "torch with CUDA + transformers not installed here: no PyTorch figure"
fi
