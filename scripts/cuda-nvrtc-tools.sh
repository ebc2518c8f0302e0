#!/usr/bin/env bash
# Lays out what a `cuda-nvrtc` build needs beside the NVIDIA driver, from PyPI's CUDA 13.0 wheels,
# into TOOLS (default ODPO_CUDA_TOOLS, else ~/.cache/odpo/cuda-tools), once:
#   lib/      libnvrtc.so.13 and libnvrtc-builtins.so.13.0 (NVRTC, which compiles the kernels' CUDA C++),
#   include/  the headers those kernels include (cuda_bf16.h, crt/, cccl/ with cuda/barrier).
# The folder is then a toolkit for the backend: CUDA_PATH names it and lib/ goes on LD_LIBRARY_PATH
# (docs/backends.md, "CUDA kernels through NVRTC"). scripts/cuda-ptx-check.sh uses it to compile an
# NVRTC build's kernels without a GPU, scripts/gpu-build.sh carries include/ to the GPU machine.
# Python (for `pip download`) is ODPO_PYTHON, default python3.
set -euo pipefail
TOOLS=${1:-${ODPO_CUDA_TOOLS:-$HOME/.cache/odpo/cuda-tools}}
PY=${ODPO_PYTHON:-python3}
WHEELS=("nvidia-cuda-nvrtc==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85")
[ -f "$TOOLS/lib/libnvrtc-builtins.so.13.0" ] && [ -f "$TOOLS/include/cccl/cuda/barrier" ] && exit 0
echo "== fetching NVRTC and the CUDA headers (${WHEELS[*]}) into $TOOLS" >&2
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
"$PY" -m pip download --quiet --no-deps -d "$dl" "${WHEELS[@]}"
"$PY" - "$dl" "$TOOLS" <<'PY'
import os, sys, zipfile, glob
dl, tools = sys.argv[1], sys.argv[2]
libs = {"libnvrtc.so.13", "libnvrtc-builtins.so.13.0"}
for wheel in sorted(glob.glob(os.path.join(dl, "*.whl"))):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            rel = name.removeprefix("nvidia/cu13/")
            if rel == name or name.endswith("/"):
                continue
            if rel.startswith("include/") or rel in {f"lib/{l}" for l in libs}:
                dest = os.path.join(tools, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with z.open(name) as src, open(dest + ".part", "wb") as out:
                    out.write(src.read())
                os.replace(dest + ".part", dest)
                libs.discard(os.path.basename(rel))
if libs:
    sys.exit(f"not found in the wheels: {sorted(libs)}")
PY
ln -sf libnvrtc.so.13 "$TOOLS/lib/libnvrtc.so"
