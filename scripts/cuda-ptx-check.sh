#!/usr/bin/env bash
# Compiles every kernel the `cuda` backend launches, for an H200, on a machine without a GPU, and
# has NVIDIA's own assembler check the result.
#
#   scripts/cuda-ptx-check.sh SUITES_BINARY [ODPO_BINARY] [OUT_DIR]
#
# SUITES_BINARY is the conformance test binary built with `cuda` (scripts/gpu-build.sh builds it into
# ~/.cache/odpo/target-gpu/release/deps/suites-*; `cargo xtask conformance --also-build cuda` into the
# shared build folder). The binaries run on a stand-in for the NVIDIA driver
# (scripts/cuda-stand-in/libcuda.c): it answers as one H200 (compute capability 9.0, CUDA 13.0 driver),
# keeps device memory in host memory, saves each PTX module the backend loads and does not run kernels.
# So most tests fail on their values, and that is expected; what the run gives is the PTX of every kernel
# the suites (and, with ODPO_BINARY, `odpo bench` on the GPU check's two step shapes in bf16, one of
# them also with gradient checkpointing, and three steps of its real run in f32, when ODPO_SHARED
# holds the model) compile, through
# the same compiler as on the GPU (LLVM's NVPTX with the same libdevice; with `cuda-nvrtc`, NVRTC 13.0
# and the CUDA headers, fetched below). Each module then goes through `ptxas
# -arch=sm_90a` from PyPI's nvidia-cuda-nvcc 13.0 (with libdevice from nvidia-nvvm 13.0), fetched once
# into ~/.cache/odpo/cuda-tools with `$ODPO_PYTHON -m pip download` (default python3).
#
# It fails when the backend reports a kernel it could not compile, ptxas rejects a module, a launch
# exceeds the device's limits, a module multiplies through TF32 tensor-core instructions (f32
# products are computed in f32: docs/backends.md, "f32 products per backend"; nothing here runs TF32
# on purpose), `odpo` writes more than a megabyte of log, or one of its commands ends in an error.
# The suites binary links libtorch when built with `tch`: its torch/lib is found through the same
# Python (`import torch`) or TORCH_LIB.
set -uo pipefail

SUITES=${1:?usage: scripts/cuda-ptx-check.sh SUITES_BINARY [ODPO_BINARY] [OUT_DIR]}
ODPO=${2:-}
OUT=${3:-$(mktemp -d)}
run_exit=0 # an `odpo` command's exit status, where one ended in an error
PY=${ODPO_PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=${ODPO_CUDA_TOOLS:-$HOME/.cache/odpo/cuda-tools}

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/ptx" "$OUT"/*.log && mkdir -p "$OUT/ptx" "$OUT/lib"

# ptxas and libdevice, from PyPI's CUDA 13.0 wheels; for a build with `cuda-nvrtc`, which compiles its
# kernels from CUDA C++ with NVRTC (which runs without a GPU), NVRTC and the headers the kernels
# include too, found through CUDA_PATH and LD_LIBRARY_PATH (scripts/cuda-tools.sh).
parts=ptxas
grep -qa 'compiles its CUDA kernels with NVRTC' "$SUITES" && parts="ptxas nvrtc"
# shellcheck disable=SC2086
ODPO_CUDA_TOOLS=$TOOLS ODPO_PYTHON=$PY "$REPO/scripts/cuda-tools.sh" $parts || exit 1
PTXAS=$TOOLS/bin/ptxas

# The stand-in driver.
cc -shared -fPIC -O1 -Wall -o "$OUT/lib/libcuda.so.1" "$REPO/scripts/cuda-stand-in/libcuda.c" || exit 1
ln -sf libcuda.so.1 "$OUT/lib/libcuda.so"

TORCH_LIB=${TORCH_LIB:-$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)}
export LD_LIBRARY_PATH="$OUT/lib:$TOOLS/lib${TORCH_LIB:+:$TORCH_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_STAND_IN_DIR=$OUT CUDA_PATH=$TOOLS ODPO_REPO=$REPO ODPO_TEST_DEVICE=cuda

echo "== the conformance suites on the stand-in driver (their values are meaningless: kernels do not run)"
"$SUITES" --test-threads 1 > "$OUT/suites.log" 2>&1
grep -E '^test result' "$OUT/suites.log" | sed -E 's/^test result: [A-Z]+\. ([0-9]+ passed; [0-9]+ failed).*/\1 (failures expected: nothing was computed)/'
if [ -n "$ODPO" ]; then
  for m in smollm2-135m llama-3.2-1b smollm2-135m:checkpointed; do
    flag=; [ "${m#*:}" = checkpointed ] && flag=--gradient-checkpointing
    echo "== odpo bench on the GPU check's ${m%%:*} step (8 pairs x 512 tokens, bf16${flag:+, checkpointed}), on the stand-in driver"
    "$ODPO" bench --config "$REPO/bench/configs/${m%%:*}.json" --backend cuda --dtype bf16 --pairs 8 --seq 512 --warmup 0 --repeats 1 $flag > "$OUT/bench-${m/:/-}.log" 2>&1
    e=$?; [ $e -eq 0 ] || run_exit=$e
    echo "exit $e (the step's figures are meaningless); log $(stat -c %s "$OUT/bench-${m/:/-}.log") bytes"
  done
  # The GPU check's real run (f32, SmolLM2-135M-Instruct from the shared folder): three steps with a
  # checkpoint and two evaluations, for the kernels and the code paths of a whole run on `cuda`.
  shared=${ODPO_SHARED:-$REPO/../shared}
  gguf=$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ -f "$gguf" ]; then
    echo "== odpo train, SmolLM2-135M-Instruct on the IMDB pairs (f32), 3 steps, on the stand-in driver"
    "$ODPO" train --config "$REPO/configs/smollm2-imdb-odpo.toml" --backend cuda --set "model.path=$gguf" \
      --set "data.path=$shared/data/odpo-paper/imdb-sft-test.jsonl" --set train.max_steps=3 --set train.micro_batch_size=8 \
      --set train.checkpoint_every=2 --set eval.every=2 --set "output.dir=$OUT/run" --set "output.cache_dir=$OUT/run-cache" \
      --set output.export=false > "$OUT/bench-run.log" 2>&1
    e=$?; [ $e -eq 0 ] || run_exit=$e
    rm -rf "$OUT/run" "$OUT/run-cache" # the checkpoint alone is 1.6 GB
    echo "exit $e (its losses are meaningless); log $(stat -c %s "$OUT/bench-run.log") bytes"
  else
    echo "== no $gguf: the real run's flow is left out"
  fi
fi

modules=$(find "$OUT/ptx" -name '*.ptx' | wc -l)
echo "== ptxas -arch=sm_90a on $modules modules"
find "$OUT/ptx" -name '*.ptx' | sort | xargs -P "$(nproc)" -I{} sh -c '"$0" -arch=sm_90a -o /dev/null "$1" > "$1.ptxas" 2>&1 || echo "$1"' "$PTXAS" {} > "$OUT/ptxas-failed.txt"
failed=$(wc -l < "$OUT/ptxas-failed.txt")
compile_errors=$(grep -ciE 'CompilationError|Compilation Error|failed to compile|LLVM ERROR|libdevice.10.bc was not found|NVRTC did not compile' "$OUT"/suites.log "$OUT"/bench-*.log 2>/dev/null | awk -F: '{s += $NF} END {print s + 0}')
# TF32 instructions (a tensor-core product or a conversion to the type), not the word: NVRTC's
# modules declare CCCL's `cuda::ptx::kind_tf32` tag whatever they compute.
tf32_re='(mma|wmma)[^ ]*\.tf32|cvt\.[a-z.]*\.tf32'
tf32=$(grep -lE "$tf32_re" "$OUT"/ptx/*.ptx 2>/dev/null | wc -l)
launched=$(sort -u "$OUT/launched.log" 2>/dev/null | wc -l)
bad_launch=0; [ -f "$OUT/bad-launch.log" ] && bad_launch=$(wc -l < "$OUT/bad-launch.log")
echo "modules: $modules; kernels launched: $launched; ptxas rejected: $failed; compile errors reported: $compile_errors; launches outside the device's limits: $bad_launch; modules with TF32 products: $tf32"
grep -lE "$tf32_re" "$OUT"/ptx/*.ptx 2>/dev/null | head -5 | while read -r f; do echo "-- TF32 in $(basename "$f"): $(grep "^$(basename "$f" .ptx) " "$OUT/launched.log" | cut -d' ' -f2)"; done
for f in $(head -5 "$OUT/ptxas-failed.txt"); do echo "-- $f"; head -5 "$f.ptxas"; done
[ -s "$OUT/bad-launch.log" ] && head -5 "$OUT/bad-launch.log"
# A log past a megabyte means some crate logs per kernel at `info` (pliron did: 170 MB a step).
flooded=0
for f in "$OUT"/bench-*.log; do [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 1048576 ] && { echo "$f: $(stat -c %s "$f") bytes of log"; flooded=1; }; done
why=()
grep -q '^test result' "$OUT/suites.log" || why+=("the suites did not run to the end (see $OUT/suites.log)")
[ "$modules" -gt 0 ] || why+=("no PTX module was loaded")
[ "$failed" -eq 0 ] || why+=("ptxas rejected $failed modules")
[ "$compile_errors" -eq 0 ] || why+=("$compile_errors compile errors reported")
[ "$bad_launch" -eq 0 ] || why+=("$bad_launch launches outside the device's limits")
[ "$tf32" -eq 0 ] || why+=("$tf32 modules with TF32 products")
[ "$flooded" -eq 0 ] || why+=("a flooded log")
[ "$run_exit" -eq 0 ] || why+=("an odpo command ended with status $run_exit (its log is in $OUT)")
if [ ${#why[@]} -gt 0 ]; then
  printf 'cuda-ptx-check: failed: %s\n' "$(IFS=';'; echo "${why[*]}")"
  exit 1
fi
echo "cuda-ptx-check: passed"
