#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a Linux GPU machine that has no Rust toolchain and no network
# (docs/backends.md, "GPU check"), into OUT (default gpu-bin/, ignored by git):
#   - `odpo` with flex, Vulkan (burn's wgpu with SPIR-V kernels), burn's CUDA backend and libtorch, and
#     `suites` (the twelve conformance suites in one test binary) with the same backends, and
#     `odpo-nvrtc`, the same `odpo` with `cuda-nvrtc` (the CUDA kernels compiled by NVRTC, which keeps
#     the TMA and barriers some matmul routines need; ODPO_GPU_NVRTC=0 leaves it out), stripped and
#     xz-compressed together;
#   - the CUDA 13.0 headers those kernels include (scripts/cuda-tools.sh nvrtc); NVRTC itself is the GPU
#     machine's, which PyTorch's CUDA wheels install (nvidia-cuda-nvrtc);
#   - libtorch is the GPU machine's own: the binaries are compiled against PyPI's torch 2.11.0 (CUDA 13.0)
#     headers and run with that machine's torch/lib on the library path (ODPO_GPU_TORCH picks another);
#   - SmolLM2-135M-Instruct (GGUF, tokenizer) and the paper's IMDB pairs from ODPO_SHARED, for the real run;
#   - Debian's Vulkan and EGL loaders as .deb files, for a machine whose NVIDIA driver has no loader beside it.
# Everything goes into one tar, cut into parts small enough that each travels with the working tree in
# one device run (64 MiB in all; ODPO_GPU_PART_MIB, by default what the working tree leaves with half a
# MiB to spare), as few as fit and of even size; MANIFEST holds their checksums. The device calls that carry the parts and
# run the check are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-bin}
TORCH=${ODPO_GPU_TORCH:-2.11.0}
# What travels with every device call: tracked files and untracked ones git does not ignore.
tree=$( (git ls-files; git ls-files -o --exclude-standard) | sort -u | while read -r f; do [ -f "$f" ] && stat -c %s "$f"; done | awk '{s += $1} END {print s + 0}')
PART_MAX=$(( ${ODPO_GPU_PART_MIB:-0} * 1048576 ))
[ "$PART_MAX" -gt 0 ] || PART_MAX=$(( 64 * 1048576 - tree - 524288 ))
SHARED=${ODPO_SHARED:-../shared}
# A build folder of its own: its libtorch (torch-sys) differs from the one CI's tch build links.
export CARGO_TARGET_DIR=${ODPO_GPU_TARGET:-$HOME/.cache/odpo/target-gpu}
FEATURES=flex,vulkan,cuda,tch
NVRTC=${ODPO_GPU_NVRTC:-1}

cargo xtask setup-cuda
cargo xtask setup-libtorch --torch "$TORCH"
venv=$HOME/.cache/odpo/libtorch-$TORCH-venv
[ "$TORCH" = 2.9.0 ] && venv=$HOME/.cache/odpo/libtorch-venv
export VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH LIBTORCH_USE_PYTORCH=1 LIBTORCH_BYPASS_VERSION_CHECK=1
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}

# The Vulkan backend with cubecl-spirv's shared-memory fix (patches/): the same kernels on NVIDIA's
# driver, and the dry run's Vulkan on Mesa's lavapipe. Cargo notes the patch in Cargo.lock; put back after.
patched=$(scripts/cubecl-spirv-patched.sh)
stage=$(mktemp -d) lock=$(mktemp)
cp Cargo.lock "$lock"
trap 'cp "$lock" Cargo.lock; rm -rf "$stage" "$lock"' EXIT
mkdir -p "$stage/bin" "$stage/model" "$stage/data" "$stage/gl" "$stage/cuda"
bins="odpo suites"

echo "== cargo build odpo ($FEATURES, torch $TORCH)"
# shellcheck disable=SC2086
cargo build --release -p odpo-cli --no-default-features --features "$FEATURES" $patched
strip -o "$stage/bin/odpo" "$CARGO_TARGET_DIR/release/odpo"
if [ "$NVRTC" = 1 ]; then
  echo "== cargo build odpo-nvrtc (${FEATURES/cuda/cuda-nvrtc})"
  # The same binary path: the build above is copied out first.
  # shellcheck disable=SC2086
  cargo build --release -p odpo-cli --no-default-features --features "${FEATURES/cuda/cuda-nvrtc}" $patched
  strip -o "$stage/bin/odpo-nvrtc" "$CARGO_TARGET_DIR/release/odpo"
  scripts/cuda-tools.sh nvrtc
  tar -C "${ODPO_CUDA_TOOLS:-$HOME/.cache/odpo/cuda-tools}" -cf - include | xz -T0 > "$stage/cuda/include.tar.xz"
  bins="odpo odpo-nvrtc suites"
fi
echo "== cargo test --no-run suites ($FEATURES)"
suites=$(cargo test --release -p odpo-trainer --no-default-features --features "$FEATURES,suites" --test suites --no-run --message-format=json $patched \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "suites":
        print(m["executable"])')
[ -x "$suites" ] || { echo "no suites binary" >&2; exit 1; }
strip -o "$stage/bin/suites" "$suites"
# The binaries share most of their code (burn, LLVM, the libtorch bindings): one xz stream whose
# window holds the first while it compresses the next takes 44 MB for `odpo` and `suites` where each
# on its own took 70 (2026-12-01), 54 with `odpo-nvrtc` (2026-12-04; xz's x86 filter made it 58), a
# device call fewer. About 7 minutes on one core; unpacking needs 256 MiB.
# shellcheck disable=SC2086
tar -C "$stage/bin" -cf - $bins | xz -T1 --lzma2=preset=9,dict=256MiB > "$stage/bin/binaries.tar.xz"
# shellcheck disable=SC2086
(cd "$stage/bin" && rm $bins)
echo "$TORCH" > "$stage/bin/torch-version"
git rev-parse HEAD > "$stage/bin/commit" 2>/dev/null || true

echo "== model and data from $SHARED"
m=$SHARED/models/smollm2-135m-instruct
cp "$m/tokenizer_config.json" "$m/chat_template.jinja" "$m/config.json" "$stage/model/"
# The GGUF's 98 MB take 90 compressed: with the third binary, the bundle stays in three parts.
xz -T0 -c "$m/SmolLM2-135M-Instruct.Q4_1.gguf" > "$stage/model/SmolLM2-135M-Instruct.Q4_1.gguf.xz"
cp "$m/generation_config.json" "$stage/model/" 2>/dev/null || true
xz -T0 -c "$m/tokenizer.json" > "$stage/model/tokenizer.json.xz"
xz -T0 -c "$SHARED/data/odpo-paper/imdb-sft-test.jsonl" > "$stage/data/imdb-sft-test.jsonl.xz"

echo "== Vulkan and EGL loaders (Debian packages)"
lists=$(mktemp -d)
o="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=$lists -oDebug::NoLocking=1"
mkdir -p "$lists/partial"
# shellcheck disable=SC2086
apt-get $o update -qq >/dev/null
# shellcheck disable=SC2086
(cd "$stage/gl" && apt-get $o download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
rm -rf "$lists"

echo "== pack"
rm -rf "$OUT" && mkdir -p "$OUT"
tar -C "$stage" -cf "$OUT/bundle.tar" .
# Each device call costs time on the machine: as few parts as fit, cut evenly (a part of a few
# kB would take a call of its own).
total=$(stat -c %s "$OUT/bundle.tar")
n=$(( (total + PART_MAX - 1) / PART_MAX ))
size=$(( (total + n - 1) / n ))
(cd "$OUT" && split -b "$size" -d -a 2 bundle.tar part- && sha256sum bundle.tar part-* > MANIFEST && rm bundle.tar)
echo "$n parts of at most $((size / 1024)) KiB (a part may be $((PART_MAX / 1024)) KiB): the working tree that travels with each is $((tree / 1048576)) MiB"
ls -l "$OUT"
parts=$(cd "$OUT" && ls part-*)
n=$(echo "$parts" | wc -l)
cat <<EOF

$n parts in $OUT. On a session lent a GPU machine, one device call each, the next as soon as the last returns
(a machine stays warm 30 s after a call; what a call copies to /tmp stays while it is warm):
EOF
i=0
for p in $parts; do
  i=$((i + 1))
  if [ "$i" -lt "$n" ]; then
    echo "  run(command=\"mkdir -p /tmp/odpo-gpu && cp $OUT/$p /tmp/odpo-gpu/\", carry=[\"$OUT/$p\"], timeout_s=120)"
  else
    echo "  run(command=\"mkdir -p /tmp/odpo-gpu && cp $OUT/$p $OUT/MANIFEST /tmp/odpo-gpu/ && scripts/gpu-check.sh /tmp/odpo-gpu \$OUT\", carry=[\"$OUT/$p\", \"$OUT/MANIFEST\"], timeout_s=540)"
  fi
done
