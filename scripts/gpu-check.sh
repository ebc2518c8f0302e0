#!/usr/bin/env bash
# The GPU check: runs on a Linux GPU machine without a Rust toolchain, from binaries built elsewhere
# (docs/backends.md, "GPU check"). Usage: scripts/gpu-check.sh BIN_DIR
#   BIN_DIR is what scripts/gpu-build.sh writes: `odpo.gz` (flex + Vulkan), the conformance test
#   binaries built for Vulkan (`parity.gz`, ..., `mixed_precision.gz`), `smollm2-config.json` (shapes
#   only) and `build-root`; and `libvulkan.so.1` if the machine lacks the Vulkan loader.
# It prints the GPU; computes completion log-probabilities of every tiny fixture model on wgpu/Vulkan
# and on the CPU (flex) and prints both; runs the parity test binaries on the GPU when present; measures
# forward throughput on SmolLM2-135M shapes on Vulkan and on the CPU; and PyTorch on the same GPU when
# torch with CUDA and transformers are installed.
set -u
BIN=${1:?usage: scripts/gpu-check.sh BIN_DIR}
cd "$(dirname "$0")/.."
for z in "$BIN"/*.gz; do [ -f "${z%.gz}" ] || gunzip -k "$z"; chmod +x "${z%.gz}"; done
# The test binaries read their fixtures from the checkout they were built in: point that path here.
if [ -f "$BIN/build-root" ]; then
  root=$(cat "$BIN/build-root")
  [ -d "$root/crates" ] || { mkdir -p "$(dirname "$root")" && ln -sfn "$PWD" "$root"; }
fi
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

echo "== conformance suites on the GPU (Vulkan): model parity, loss parity, three ODPO steps against PyTorch, ..."
for t in parity parity_neo pytorch_parity gradients conformance shared_prompt data_parallel mixed_precision; do
  [ -x "$BIN/$t" ] || continue
  echo "-- $t"
  timeout 240 "$BIN/$t" --test-threads=1 --nocapture 2>&1 | grep -E "max|worst|weights|largest|refused|Δ|devices|test result|panicked" | head -20
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

echo "== ODPO training step, SmolLM2-135M shapes, 4 pairs x 128 tokens, f32"
mkdir -p /tmp/gpu-check
timeout 240 "$BIN/odpo" bench --config "$BIN/smollm2-config.json" --backend vulkan --pairs 4 --seq 128 --repeats 5 > /tmp/gpu-check/odpo-vulkan.json 2>/dev/null
if python3 -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null; then
  timeout 240 python3 bench/pytorch/step.py --device cuda --config "$BIN/smollm2-config.json" --pairs 4 --seq 128 --repeats 10 --threads 16 > /tmp/gpu-check/pytorch-cuda.json 2>/dev/null
fi
python3 - <<'PY'
import json
rows = [("odpo, burn wgpu/Vulkan", "/tmp/gpu-check/odpo-vulkan.json"), ("PyTorch (transformers, TRL's step), CUDA", "/tmp/gpu-check/pytorch-cuda.json")]
print("| step | tokens/s | s/step (min-max) | peak host memory |")
print("|---|---|---|---|")
for name, path in rows:
    try:
        r = json.load(open(path))
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['seconds_per_step_median']:.3f} ({r['seconds_per_step_min']:.3f}-{r['seconds_per_step_max']:.3f}) | {r.get('peak_rss_mib', 0):.0f} MiB |")
    except Exception as e:
        print(f"| {name} | failed or not run ({type(e).__name__}) | | |")
PY
