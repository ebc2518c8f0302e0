#!/usr/bin/env bash
# Which PyTorch versions burn-tch 0.22's libtorch bindings work with: for each version, compiles
# torch-sys 0.22.0's C++ layer (libtch: torch_api.cpp and the generated torch_api_generated.cpp, the
# flags torch-sys's build script uses) against that wheel's headers, then links it into a shared
# object against the wheel's libtorch with --no-undefined, so that every libtorch symbol the bindings
# call must exist in that version. Usage: scripts/libtorch-compat.sh 2.9.0 2.10.0 2.11.0 ...
# Wheels come from PyPI (pip download, kept in ~/.cache/odpo/torch-wheels); needs g++ and cargo's
# copy of torch-sys (any tch build fetches it). Prints one line per version and exits non-zero if any failed.
set -u
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: scripts/libtorch-compat.sh VERSION..." >&2; exit 2; }
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/torch-sys-0.22.0/libtch 2>/dev/null | head -1)
[ -n "$src" ] || { echo "torch-sys 0.22.0 is not in cargo's registry: run cargo fetch" >&2; exit 2; }
cache=$HOME/.cache/odpo/torch-wheels
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$cache"
failed=0
for v in "$@"; do
  whl=$(ls "$cache"/torch-"$v"-*cp311*manylinux*x86_64.whl 2>/dev/null | head -1)
  if [ -z "$whl" ]; then
    pip download -q --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 -d "$cache" "torch==$v" >/dev/null 2>&1
    whl=$(ls "$cache"/torch-"$v"-*cp311*manylinux*x86_64.whl 2>/dev/null | head -1)
  fi
  [ -n "$whl" ] || { echo "$v: no wheel on PyPI"; failed=1; continue; }
  d=$work/$v
  mkdir -p "$d" && unzip -q -o "$whl" 'torch/include/*' 'torch/lib/*' -d "$d"
  inc="-I$d/torch/include -I$d/torch/include/torch/csrc/api/include"
  ok=1
  for f in torch_api torch_api_generated; do
    # shellcheck disable=SC2086
    g++ -std=c++17 -O0 -fPIC -w -D_GLIBCXX_USE_CXX11_ABI=1 -DGLOG_USE_GLOG_EXPORT $inc -c "$src/$f.cpp" -o "$d/$f.o" 2> "$d/$f.err" \
      || { ok=0; echo "$v: $f.cpp does not compile: $(grep -m1 'error' "$d/$f.err")"; }
  done
  if [ "$ok" = 1 ]; then
    libs="-ltorch -ltorch_cpu -lc10"
    [ -f "$d/torch/lib/libtorch_cuda.so" ] && libs="$libs -ltorch_cuda"
    # shellcheck disable=SC2086
    g++ -shared -o "$d/libcheck.so" "$d/torch_api.o" "$d/torch_api_generated.o" -L"$d/torch/lib" $libs \
      -Wl,--no-undefined -Wl,--allow-shlib-undefined 2> "$d/link.err"
    # The `tch_*` callbacks (streams) are defined on the Rust side of torch-sys: only they may be missing.
    missing=$(grep -o "undefined reference to \`[^']*'" "$d/link.err" | sed "s/undefined reference to \`//; s/'$//" | grep -v '^tch_' | sort -u)
    if [ -z "$missing" ] && ! grep -q "cannot find\|error adding symbols\|file format not recognized" "$d/link.err"; then
      echo "$v: compiles and links ($(basename "$whl"))"
    else
      ok=0
      echo "$v: does not link: $(echo "$missing" | head -3 | tr '\n' ' ')$(grep -m2 "cannot find\|error adding" "$d/link.err")"
    fi
  fi
  [ "$ok" = 1 ] || failed=1
  rm -rf "$d"
done
exit "$failed"
