#!/usr/bin/env bash
# The GPU check: every GPU backend on one machine, from what scripts/gpu-build.sh made elsewhere (this
# machine needs no Rust toolchain and no network). Usage: scripts/gpu-check.sh BUNDLE_DIR OUT_DIR
#   BUNDLE_DIR holds gpu-build.sh's parts and MANIFEST; OUT_DIR receives gpu-check.log (everything
#   printed), gpu-check.json (every figure) and gpu-check.md (the tables), rewritten after each stage
#   so that a run cut short still returns what it measured.
# For each backend (GPU_CHECK_BACKENDS, default "tch-cuda cuda vulkan": the fastest first, so that a budget
# that runs out leaves the slower ones out, and stage 4 runs on it):
#   1. the conformance suites: model parity of twenty-one tiny models against transformers, loss parity, three
#      ODPO steps against PyTorch, shared prompt, data parallel, bf16/f16 mixed precision;
#   2. the ODPO step benchmark beside PyTorch eager (bench/pytorch/step.py, TRL's step) on SmolLM2-135M
#      and Llama-3.2-1B shapes with random weights, 8 pairs x 512 tokens, bf16 (f16 on Vulkan, which
#      has no bf16): tokens/s, MFU against the card's bf16 peak, peak GPU memory (NVML, bench/gpu_peak.py);
#      the rows as `--layout auto` lays them out on a GPU (concatenated), and the shared prompt beside
#      them on GPU_CHECK_LAYOUT_BACKENDS (default tch-cuda);
#   2b. each matmul routine (`odpo bench --matmul-routines`) timed on the bf16 products of one step on
#      GPU_CHECK_ROUTINE_BACKENDS (default "cuda cuda-nvrtc") for GPU_CHECK_ROUTINE_MODELS (default
#      llama-3.2-1b), at most GPU_CHECK_ROUTINE_BUDGET seconds (default 60) of routines each; then the
#      step of 2 again with the fastest routine that took every product and agreed with burn's (`odpo
#      --matmul NAME`; on cuda-nvrtc with burn's own routine too when that was the fastest).
#      `cuda-nvrtc` is `odpo-nvrtc --backend cuda`: the kernels compiled by NVRTC, with the carried CUDA
#      headers and this machine's libnvrtc (PyTorch's nvidia-cuda-nvrtc wheel, or a CUDA toolkit);
#   3. ODPO on the real SmolLM2-135M-Instruct with the paper's IMDB pairs for 100 steps, and the same
#      run's first steps on the CPU (tch; flex in the dry run) beside it;
#   4. the step of 2 with gradient checkpointing on the first backend: its peak memory and time
#      beside the plain step's (what the budget leaves);
#   5. a step far too large for the device: `odpo bench` must stop with an out-of-memory error, not a
#      panic (what the budget leaves);
#   6. the kernels of one step of SmolLM2-135M (GPU_CHECK_CENSUS_MODEL; GPU_CHECK_CENSUS_BACKENDS, default PyTorch and the
#      GPU backends, tch-cuda's through CUPTI): launches per step and each kernel's device time (what the budget leaves).
# Stages run in that order within GPU_CHECK_BUDGET seconds (default 400; with unpacking, under 7 minutes); one that
# would not fit is recorded as skipped. GPU_CHECK_STAGES names the stages to run and their order (default
# "1 2 2b 3 4 5 6"; "2b 4" runs the matmul routines, then gradient checkpointing, nothing else), so that a
# second call can finish what a budget left out. GPU_CHECK_QUICK=1 runs small shapes and few steps: the dry
# run on a machine without a GPU (GPU_CHECK_BACKENDS="vulkan tch", PyTorch on the CPU), docs/backends.md.
# GPU_CHECK_RUN_ARGS adds arguments to the real runs' `odpo train` (the dry run's batches of one pair keep
# Vulkan's tensors under the 128 MiB buffers of Mesa's lavapipe). What each stage runs on: GPU_CHECK_BACKENDS
# (1, 2), GPU_CHECK_MODELS (2, 4), GPU_CHECK_ROUTINE_MODELS (2b), GPU_CHECK_RUN_BACKENDS (3; GPU_CHECK_CPU_STEPS=0
# leaves out its CPU side), GPU_CHECK_CKPT_BACKEND with GPU_CHECK_CKPT_MODELS (4), GPU_CHECK_OOM_BACKENDS (5)
# and GPU_CHECK_CENSUS_BACKENDS (6); " " for none.
set -u
cd "$(dirname "$0")/.."
BUNDLE=${1:?usage: scripts/gpu-check.sh BUNDLE_DIR OUT_DIR}
OUT=${2:?usage: scripts/gpu-check.sh BUNDLE_DIR OUT_DIR}
BUDGET=${GPU_CHECK_BUDGET:-400}
STAGES=${GPU_CHECK_STAGES:-1 2 2b 3 4 5 6}
BACKENDS=${GPU_CHECK_BACKENDS:-tch-cuda cuda vulkan}
RUN_BACKENDS=${GPU_CHECK_RUN_BACKENDS:-$BACKENDS}
OOM_BACKENDS=${GPU_CHECK_OOM_BACKENDS:-$BACKENDS}
CKPT_BACKEND=${GPU_CHECK_CKPT_BACKEND-${BACKENDS%% *}}
QUICK=${GPU_CHECK_QUICK:-0}
PY=${GPU_CHECK_PYTHON:-python3}
start=$SECONDS
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu-check.log
W=${GPU_CHECK_WORK:-/tmp/odpo-gpu-check}
rm -rf "$W" && mkdir -p "$W/records"
exec > >(tee -a "$LOG") 2>&1
for stage in $STAGES; do
  case $stage in 1|2|2b|3|4|5|6) ;; *) echo "GPU_CHECK_STAGES: no stage \"$stage\"; the stages are 1 2 2b 3 4 5 6"; exit 2 ;; esac
done

if [ "$QUICK" = 1 ]; then
  MODELS=${GPU_CHECK_MODELS:-gpt2-tiny}; CENSUS_MODEL=${GPU_CHECK_CENSUS_MODEL:-gpt2-tiny}; SHAPE=${GPU_CHECK_SHAPE:-2x64}; STEPS=${GPU_CHECK_STEPS:-4}; CPU_STEPS=${GPU_CHECK_CPU_STEPS:-2}
  PT_DEVICE=cpu; REPEATS=2
else
  MODELS=${GPU_CHECK_MODELS:-smollm2-135m llama-3.2-1b}; CENSUS_MODEL=${GPU_CHECK_CENSUS_MODEL:-smollm2-135m}; SHAPE=${GPU_CHECK_SHAPE:-8x512}; STEPS=${GPU_CHECK_STEPS:-100}; CPU_STEPS=${GPU_CHECK_CPU_STEPS:-4}
  PT_DEVICE=cuda; REPEATS=5
fi
PAIRS=${SHAPE%x*} SEQ=${SHAPE#*x}

left() { echo $((BUDGET - (SECONDS - start))); }
# cap SECONDS: a stage's time limit, no later than the end of the budget.
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo $((l > 10 ? l : 10)); }
# record NAME JSON: one stage's figures; the report is rebuilt after each.
record() {
  printf '%s\n' "$2" > "$W/records/$(printf '%03d' $((SECONDS - start)))-$1.json"
  "$PY" scripts/gpu-report.py "$W/records" "$OUT" > /dev/null || true
}
# fits SECONDS: whether a stage expected to take that long fits in what is left of the budget.
fits() {
  if [ "$(left)" -lt "$1" ]; then
    echo "-- skipped: $(left) s left of the budget, the stage needs about $1 s"
    return 1
  fi
}
burn_name() { case $1 in tch-cuda) echo tch ;; *) echo "${1%%:*}" ;; esac; }

echo "== bundle"
(
  cd "$BUNDLE" || exit 1
  missing=0
  for p in $(awk '$2 ~ /^part-/ {print $2}' MANIFEST); do
    [ -f "$p" ] || { echo "missing $p: send it again (scripts/gpu-build.sh printed the device calls)"; missing=1; }
  done
  [ "$missing" = 0 ] || exit 3
  sha256sum -c --quiet --ignore-missing MANIFEST || exit 4
  rm -rf x && mkdir x && cat $(awk '$2 ~ /^part-/ {print $2}' MANIFEST) | tar -C x -xf - || exit 5
  { xz -dc x/bin/binaries.tar.xz | tar -C x/bin -xf - && rm x/bin/binaries.tar.xz; } || exit 5
  chmod +x x/bin/odpo x/bin/suites
  if [ -f x/bin/odpo-nvrtc ]; then
    chmod +x x/bin/odpo-nvrtc
    mkdir -p x/cuda-nvrtc && xz -dc x/cuda/include.tar.xz | tar -C x/cuda-nvrtc -xf - || exit 5
  fi
  unxz -f x/data/*.xz x/model/*.xz
) || { echo "the bundle in $BUNDLE is incomplete or damaged"; exit 3; }
X=$(cd "$BUNDLE/x" && pwd)
ODPO=$X/bin/odpo
echo "built from commit $(cat "$X/bin/commit" 2>/dev/null), against torch $(cat "$X/bin/torch-version" 2>/dev/null)"

echo "== machine"
# libtorch: this machine's own PyTorch.
TORCH_LIB=$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${TORCH_LIB:+$TORCH_LIB:}${LD_LIBRARY_PATH:-}
# Vulkan: the NVIDIA driver's ICD, and Debian's loaders when the machine lacks them. The driver's
# Vulkan library is its GLX one, which needs glvnd's dispatch library beside the Vulkan loader.
if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1 ' || ! ldconfig -p 2>/dev/null | grep -q 'libGLdispatch.so.0 '; then
  echo "no Vulkan or glvnd loader here: unpacking the carried Debian packages into /"
  for f in "$X"/gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
  if [ -f "$icd" ]; then
    export VK_DRIVER_FILES=$icd
    egl=${icd%/vulkan/icd.d/nvidia_icd.json}/glvnd/egl_vendor.d/10_nvidia.json
    [ -f "$egl" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$egl
    break
  fi
done
# libdevice (the CUDA backend's math functions): the toolkit's, else the copy Triton carries.
if [ -z "${CUDA_PATH:-}" ] && [ ! -f /usr/local/cuda/nvvm/libdevice/libdevice.10.bc ]; then
  ld=$(ls /usr/local/cuda*/nvvm/libdevice/libdevice.10.bc 2>/dev/null | head -1)
  [ -n "$ld" ] || ld=$("$PY" -c 'import triton, os; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/lib/libdevice.10.bc"))' 2>/dev/null)
  if [ -f "$ld" ]; then
    mkdir -p "$W/cuda/nvvm/libdevice" && ln -sf "$ld" "$W/cuda/nvvm/libdevice/libdevice.10.bc"
    export CUDA_PATH=$W/cuda
  fi
fi
# cuda_lib FILE TOOLKIT_GLOB: the folder of this machine's FILE, from PyTorch's CUDA wheels
# (site-packages/nvidia/cu13/lib) or a CUDA toolkit's TOOLKIT_GLOB; nothing when neither has it.
cuda_lib() {
  "$PY" - "$1" "$2" <<'PY' 2>/dev/null
import glob, os, sys
name, toolkit = sys.argv[1], sys.argv[2]
for d in [os.path.join(p, "nvidia/cu13/lib") for p in sys.path if p] + sorted(glob.glob(toolkit)):
    if os.path.exists(os.path.join(d, name)):
        print(os.path.realpath(d))
        break
PY
}
# NVRTC for odpo-nvrtc: this machine's libnvrtc.so.13; the headers are the bundle's.
NVRTC_LIB=${GPU_CHECK_NVRTC_LIB:-$(cuda_lib libnvrtc.so.13 "/usr/local/cuda*/lib64")}
# CUPTI for the kernels of a tch-cuda step (stage 6): this machine's libcupti.so.13, which torch's
# profiler uses.
CUPTI_LIB=${GPU_CHECK_CUPTI_LIB:-$(cuda_lib libcupti.so.13 "/usr/local/cuda*/extras/CUPTI/lib64")}
nvrtc_env=()
if [ -x "$X/bin/odpo-nvrtc" ] && [ -n "$NVRTC_LIB" ]; then
  nvrtc_env=(env "CUDA_PATH=$X/cuda-nvrtc" "LD_LIBRARY_PATH=$NVRTC_LIB:$LD_LIBRARY_PATH")
fi
export ODPO_REPO=$PWD XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} RUST_BACKTRACE=1
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
echo "gpu: ${gpu:-none}; cpus: $(nproc); torch lib: ${TORCH_LIB:-none}; VK_DRIVER_FILES=${VK_DRIVER_FILES:-}; CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}; NVRTC: ${NVRTC_LIB:-none}; CUPTI: ${CUPTI_LIB:-none}"
missing=$(ldd "$ODPO" | grep 'not found')
[ -z "$missing" ] || echo "odpo cannot load: $missing"
"$PY" - "$W/machine.json" "$PT_DEVICE" <<'PY'
import json, os, sys, time, platform
out, device = sys.argv[1], sys.argv[2]
info = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "python": platform.python_version()}
try:
    import torch
    info["torch"] = torch.__version__
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        # The bf16 matmul rate of this card, 8192^3, the mean of ten after three warm-ups.
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        info["bf16_matmul_tflops"] = 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12
    import transformers
    info["transformers"] = transformers.__version__
except Exception as e:
    info["error"] = repr(e)
json.dump(info, open(out, "w"))
print(info)
PY
record machine "$(cat "$W/machine.json")"

# conformance BACKEND: runs the suites there and records them; fails when the binary crashed.
conformance() {
  local b=$1 t0=$SECONDS rc dp
  echo "-- $b"
  fits 30 || { record "conformance-$b" "{\"stage\":\"conformance\",\"backend\":\"$b\",\"skipped\":true}"; return 0; }
  # One GPU: data parallelism runs over the device twice (the split and the sum of the gradients).
  dp=${GPU_CHECK_DP_DEVICES:-$b,$b}
  ODPO_TEST_DEVICE=$b ODPO_DP_DEVICES=$dp BURN_DEVICE=$(burn_name "$b") timeout "$(cap "${GPU_CHECK_SUITE_TIMEOUT:-150}")" "$X/bin/suites" --test-threads=4 --nocapture > "$W/conformance-$b.log" 2>&1
  rc=$?
  cat "$W/conformance-$b.log"
  "$PY" - "$W/conformance-$b.log" "$b" "$rc" "$((SECONDS - t0))" > "$W/c.json" <<'PY'
import json, re, sys
log, backend, rc, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text = open(log, errors="replace").read()
m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed", text)
figures = [l.strip() for l in text.splitlines() if re.search(r"max \|diff\||max rel err|largest|worst|\|Δ|weights|refused|trained", l)]
print(json.dumps({"stage": "conformance", "backend": backend, "rc": rc, "seconds": secs,
                  "passed": int(m.group(2)) if m else 0, "failed": int(m.group(3)) if m else None,
                  "failures": re.findall(r"test (\S+) \.\.\. FAILED", text),
                  "panics": [l.strip() for l in text.splitlines() if "panicked at" in l or l.startswith("thread '")][:20],
                  "figures": figures[:80]}))
PY
  record "conformance-$b" "$(cat "$W/c.json")"
  # 124: the time limit; 128 and above: a signal (a crash in the driver).
  [ "$rc" -lt 124 ]
}

stage_1() {
echo "== 1. conformance suites"
for b in $BACKENDS; do
  conformance "$b" || echo "-- $b: the suites did not finish (exit status above 123: a crash or the time limit)"
done
}

stage_2() {
echo "== 2. ODPO step, $SHAPE, bf16 (Vulkan f16), against PyTorch eager"
for m in $MODELS; do
  cfg=bench/configs/$m.json
  echo "-- $m PyTorch ($PT_DEVICE)"
  if fits 40; then
    "$PY" bench/gpu_peak.py "$W/mem.json" -- timeout "$(cap 150)" "$PY" bench/pytorch/step.py --config "$cfg" --device "$PT_DEVICE" --dtype bf16 \
      --pairs "$PAIRS" --seq "$SEQ" --threads "$(nproc)" --warmup 2 --repeats "$REPEATS" > "$W/step.json"
    record "bench-$m-pytorch" "$("$PY" scripts/gpu-report.py --merge bench "$m" pytorch "$W/step.json" "$W/mem.json")"
  fi
  for b in $BACKENDS; do
    case $b in vulkan|wgpu*) dtype=f16 ;; *) dtype=bf16 ;; esac
    echo "-- $m odpo $b ($dtype)"
    fits 40 || { record "bench-$m-$b" "{\"stage\":\"bench\",\"model\":\"$m\",\"side\":\"$b\",\"skipped\":true}"; continue; }
    "$PY" bench/gpu_peak.py "$W/mem.json" -- timeout "$(cap 150)" "$ODPO" bench --config "$cfg" --backend "$b" --dtype "$dtype" \
      --pairs "$PAIRS" --seq "$SEQ" --warmup 2 --repeats "$REPEATS" > "$W/step.json"
    record "bench-$m-$b" "$("$PY" scripts/gpu-report.py --merge bench "$m" "$b" "$W/step.json" "$W/mem.json")"
  done
  # The default rows (`--layout auto`) are concatenated on a GPU; the shared prompt beside them, on
  # the backends of GPU_CHECK_LAYOUT_BACKENDS, shows what that choice is worth here: on SmolLM2-135M,
  # whose step waits on the host, and on Llama-3.2-1B, whose step is closer to the GPU's limit, where
  # the shared prompt's fewer tokens may win.
  for b in ${GPU_CHECK_LAYOUT_BACKENDS-tch-cuda}; do
    case " $BACKENDS " in *" $b "*) ;; *) continue ;; esac
    case $b in vulkan|wgpu*) dtype=f16 ;; *) dtype=bf16 ;; esac
    echo "-- $m odpo $b ($dtype), shared prompt"
    fits 40 || { record "bench-$m-$b-shared" "{\"stage\":\"bench\",\"model\":\"$m\",\"side\":\"$b, shared prompt\",\"skipped\":true}"; continue; }
    "$PY" bench/gpu_peak.py "$W/mem.json" -- timeout "$(cap 150)" "$ODPO" bench --config "$cfg" --backend "$b" --dtype "$dtype" \
      --pairs "$PAIRS" --seq "$SEQ" --warmup 2 --repeats "$REPEATS" --layout shared-prompt > "$W/step.json"
    record "bench-$m-$b-shared" "$("$PY" scripts/gpu-report.py --merge bench "$m" "$b, shared prompt" "$W/step.json" "$W/mem.json")"
  done
done
}

stage_2b() {
echo "== 2b. matmul routines on the products of one step, and the step with the fastest"
# burn's cuda backend multiplies through one routine (cubek's Auto); the Llama-3.2-1B step of
# 2026-11-30 reached 7.1% of the card's matmul peak on it. Each routine is timed on random operands
# of the step's own products (shapes, transposed views, type), then the step runs with the fastest.
if [ "$QUICK" = 1 ]; then routine_models=${GPU_CHECK_ROUTINE_MODELS:-gpt2-tiny}; routine_backends=${GPU_CHECK_ROUTINE_BACKENDS:-vulkan}
else routine_models=${GPU_CHECK_ROUTINE_MODELS:-llama-3.2-1b}; routine_backends=${GPU_CHECK_ROUTINE_BACKENDS:-cuda cuda-nvrtc}; fi
for m in $routine_models; do
  for b in $routine_backends; do
    case $b in vulkan|wgpu*) dtype=f16 ;; *) dtype=bf16 ;; esac
    # cuda-nvrtc: odpo-nvrtc on the cuda device, with NVRTC's environment, the routines only NVRTC
    # runs (TMA, barriers) first: its kernels take longer to compile, which the budget counts.
    run=("$ODPO") be=$b routines=${GPU_CHECK_ROUTINES:-all}
    if [ "$b" = cuda-nvrtc ]; then
      if [ "${#nvrtc_env[@]}" = 0 ]; then
        why="no odpo-nvrtc in the bundle"; [ -x "$X/bin/odpo-nvrtc" ] && why="no libnvrtc.so.13 here (GPU_CHECK_NVRTC_LIB names its folder)"
        echo "-- $m $b: skipped, $why"
        record "routines-$m-$b" "{\"stage\":\"routines\",\"model\":\"$m\",\"backend\":\"$b\",\"skipped\":true,\"why\":\"$why\"}"
        continue
      fi
      run=("${nvrtc_env[@]}" "$X/bin/odpo-nvrtc") be=cuda
      routines=${GPU_CHECK_ROUTINES:-specialized_tma_mma,specialized_tma_cmma,simple_tma_mma,simple_tma_cmma,specialized_cyclic_mma,specialized_cyclic_cmma,double_cyclic_mma_specialized,double_cyclic_cmma_specialized,double_cyclic_mma,double_cyclic_cmma,simple_cyclic_mma,simple_cyclic_mma_rows,simple_cyclic_cmma_rows,ordered_double_mma,ordered_double_cmma}
    fi
    echo "-- $m $b ($dtype)"
    fits 60 || { record "routines-$m-$b" "{\"stage\":\"routines\",\"model\":\"$m\",\"backend\":\"$b\",\"skipped\":true}"; continue; }
    rb=${GPU_CHECK_ROUTINE_BUDGET:-60}; [ "$rb" -lt $(($(left) - 50)) ] || rb=$(($(left) - 50))
    timeout "$(cap $((rb + 60)))" "${run[@]}" bench --config "bench/configs/$m.json" --backend "$be" --dtype "$dtype" \
      --pairs "$PAIRS" --seq "$SEQ" --warmup 1 --repeats 1 --matmul-routines "$routines" --routines-budget "$rb" \
      > "$W/routines.json" 2> "$W/routines.err"
    echo "exit $?"; grep -v "matmul routine timed" "$W/routines.err" | tail -3 | cut -c1-300
    record "routines-$m-$b" "$("$PY" scripts/gpu-report.py --merge routines "$m" "$b" "$W/routines.json")"
    best=$("$PY" scripts/gpu-report.py --best-routine "$W/routines.json")
    echo "fastest routine that took every product: $best"
    # burn's own routine already has its step in 2, except under NVRTC.
    matmul=(--matmul "$best")
    if [ "$best" = auto ]; then [ "$b" = cuda-nvrtc ] || continue; matmul=(); fi
    fits 40 || { record "bench-$m-$b-$best" "{\"stage\":\"bench\",\"model\":\"$m\",\"side\":\"$b, matmul $best\",\"skipped\":true}"; continue; }
    "$PY" bench/gpu_peak.py "$W/mem.json" -- timeout "$(cap 150)" "${run[@]}" bench "${matmul[@]}" --config "bench/configs/$m.json" --backend "$be" --dtype "$dtype" \
      --pairs "$PAIRS" --seq "$SEQ" --warmup 2 --repeats "$REPEATS" > "$W/step.json"
    record "bench-$m-$b-$best" "$("$PY" scripts/gpu-report.py --merge bench "$m" "$b, matmul $best" "$W/step.json" "$W/mem.json")"
  done
done
}

stage_3() {
echo "== 3. ODPO on SmolLM2-135M-Instruct with the paper's IMDB pairs, $STEPS steps, and the first steps on the CPU"
# The CPU side runs on libtorch's CPU backend (GPU_CHECK_CPU_BACKEND, default tch): on the H200's 16
# cores flex spent 82 s of the budget on one step (2026-11-30). The dry run, where tch stands in for a
# GPU, keeps flex. GPU_CHECK_CPU_STEPS=0 leaves the CPU run out (a second call that only finishes the
# GPU runs).
if [ "$QUICK" = 1 ]; then cpu=${GPU_CHECK_CPU_BACKEND:-flex}; else cpu=${GPU_CHECK_CPU_BACKEND:-tch}; fi
[ "$CPU_STEPS" = 0 ] && cpu=
for b in $cpu $RUN_BACKENDS; do
  steps=$STEPS; [ "$b" = "$cpu" ] && steps=$CPU_STEPS
  echo "-- $b, $steps steps"
  fits 60 || { record "run-$b" "{\"stage\":\"run\",\"backend\":\"$b\",\"skipped\":true}"; continue; }
  t0=$SECONDS
  timeout "$(cap "${GPU_CHECK_RUN_TIMEOUT:-200}")" "$ODPO" train --config configs/smollm2-imdb-odpo.toml --backend "$b" \
    --set "model.path=$X/model/SmolLM2-135M-Instruct.Q4_1.gguf" --set "data.path=$X/data/imdb-sft-test.jsonl" \
    --set train.max_steps="$steps" --set train.micro_batch_size=8 --set train.log_every=1 --set train.checkpoint_every=0 \
    --set eval.every=25 --set "output.dir=$W/run-$b" --set "output.cache_dir=$W/cache-$b" --set output.export=false ${GPU_CHECK_RUN_ARGS:-} \
    > "$W/run-$b.log" 2>&1
  echo "exit $?"
  grep -v '^\s*$' "$W/run-$b.log" | tail -12
  record "run-$b" "$("$PY" scripts/gpu-report.py --merge run "$b" "$W/run-$b/metrics.jsonl" "$((SECONDS - t0))")"
done
}

stage_4() {
echo "== 4. Gradient checkpointing (train.gradient_checkpointing), $SHAPE, on ${CKPT_BACKEND:-no backend}, beside its plain step in 2"
b=$CKPT_BACKEND
case $b in vulkan|wgpu*) dtype=f16 ;; *) dtype=bf16 ;; esac
ckpt_models=${GPU_CHECK_CKPT_MODELS-$MODELS}
[ -n "${b// /}" ] || ckpt_models=
for m in $ckpt_models; do
  echo "-- $m odpo $b ($dtype), checkpointed"
  fits 40 || { record "bench-$m-$b-ckpt" "{\"stage\":\"bench\",\"model\":\"$m\",\"side\":\"$b, checkpointed\",\"skipped\":true}"; continue; }
  "$PY" bench/gpu_peak.py "$W/mem.json" -- timeout "$(cap 150)" "$ODPO" bench --config "bench/configs/$m.json" --backend "$b" --dtype "$dtype" \
    --pairs "$PAIRS" --seq "$SEQ" --warmup 2 --repeats "$REPEATS" --gradient-checkpointing > "$W/step.json"
  record "bench-$m-$b-ckpt" "$("$PY" scripts/gpu-report.py --merge bench "$m" "$b, checkpointed" "$W/step.json" "$W/mem.json")"
done
}

stage_5() {
echo "== 5. A step too large for the device: an error that names what to lower, not a crash"
# Llama-3.2-1B shapes, 4096 pairs x 8192 tokens: the embedding alone needs several hundred GiB. The
# dry run takes a shape with buffers larger than lavapipe allows (on a CPU, libtorch would try to
# compute it, so the dry run leaves tch out).
if [ "$QUICK" = 1 ]; then OOM_MODEL=gpt2-tiny OOM_SHAPE=4096x256; else OOM_MODEL=llama-3.2-1b OOM_SHAPE=4096x8192; fi
for b in $OOM_BACKENDS; do
  [ "$QUICK" = 1 ] && [ "${b%%:*}" = tch ] && continue
  echo "-- $b, $OOM_MODEL $OOM_SHAPE"
  fits 30 || { record "oom-$b" "{\"stage\":\"oom\",\"backend\":\"$b\",\"skipped\":true}"; continue; }
  t0=$SECONDS
  timeout "$(cap 90)" "$ODPO" bench --config "bench/configs/$OOM_MODEL.json" --backend "$b" --pairs "${OOM_SHAPE%x*}" --seq "${OOM_SHAPE#*x}" \
    --warmup 0 --repeats 1 > "$W/oom-$b.log" 2>&1
  rc=$?
  grep -v '^\s*$' "$W/oom-$b.log" | tail -4 | cut -c1-400
  "$PY" - "$W/oom-$b.log" "$b" "$rc" "$((SECONDS - t0))" > "$W/o.json" <<'PY'
import json, sys
log, backend, rc, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lines = open(log, errors="replace").read().splitlines()
error = next((l for l in lines if l.startswith("error: ")), None)
print(json.dumps({"stage": "oom", "backend": backend, "rc": rc, "seconds": secs, "error": error,
                  "panicked": any("panicked at" in l for l in lines),
                  "ok": rc == 2 and error is not None and "out of memory" in error and not any("panicked at" in l for l in lines)}))
PY
  record "oom-$b" "$(cat "$W/o.json")"
done
}

stage_6() {
echo "== 6. The kernels of one step, $CENSUS_MODEL $SHAPE: launches and device time, odpo's GPU backends beside PyTorch's"
# `odpo bench --kernel-times` counts every kernel launch of one step after the timed ones and times
# each on the device (on tch-cuda through CUPTI, whose records torch.profiler reads for PyTorch's:
# the same kernels by the same names); bench/pytorch/step.py --kernels the same through
# torch.profiler. A step that waits on the host costs about its launches times the host's cost per
# launch, and the list says which kernels hold the device time (what the budget leaves).
for b in ${GPU_CHECK_CENSUS_BACKENDS-pytorch $BACKENDS}; do
  census_env=()
  case $b in
    tch-cuda) dtype=bf16; census_env=(env "LD_LIBRARY_PATH=${CUPTI_LIB:+$CUPTI_LIB:}$LD_LIBRARY_PATH") ;;
    tch*) continue ;;
    vulkan|wgpu*) dtype=f16 ;;
    *) dtype=bf16 ;;
  esac
  echo "-- $b ($dtype)"
  fits 40 || { record "census-$b" "{\"stage\":\"census\",\"model\":\"$CENSUS_MODEL\",\"side\":\"$b\",\"skipped\":true}"; continue; }
  if [ "$b" = pytorch ]; then
    timeout "$(cap 120)" "$PY" bench/pytorch/step.py --config "bench/configs/$CENSUS_MODEL.json" --device "$PT_DEVICE" --dtype bf16 \
      --pairs "$PAIRS" --seq "$SEQ" --threads "$(nproc)" --warmup 1 --repeats 1 --kernels > "$W/census.json" 2> "$W/census.err"
  else
    timeout "$(cap 120)" "${census_env[@]}" "$ODPO" bench --config "bench/configs/$CENSUS_MODEL.json" --backend "$b" --dtype "$dtype" \
      --pairs "$PAIRS" --seq "$SEQ" --warmup 1 --repeats 1 --kernel-times > "$W/census.json" 2> "$W/census.err"
  fi
  echo "exit $?"; tail -3 "$W/census.err" | cut -c1-300
  record "census-$b" "$("$PY" scripts/gpu-report.py --merge census "$CENSUS_MODEL" "$b" "$W/census.json")"
done
}

for stage in $STAGES; do
  "stage_$stage"
done

echo "== summary ($((SECONDS - start)) s)"
"$PY" scripts/gpu-report.py "$W/records" "$OUT"
