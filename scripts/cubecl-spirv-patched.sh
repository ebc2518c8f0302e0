#!/usr/bin/env bash
# Prints the Cargo flags that build the `vulkan` backend with patches/cubecl-spirv-*.patch applied
# (shared memory on Vulkan devices without VK_KHR_workgroup_memory_explicit_layout, such as Mesa's
# lavapipe; docs/backends.md, "Vulkan"), after laying out the patched copy of the crate outside the
# checkout (ODPO_CACHE, default ~/.cache/odpo): the patch, and ODPO_CUBECL_SPIRV_FIX in the build's
# environment, by which odpo-model knows the fix is in (without it, a device that lacks the extension
# is refused rather than crashed on). Usage:
#   cargo build --release -p odpo-cli --features vulkan $(scripts/cubecl-spirv-patched.sh)
# Cargo records the patch in Cargo.lock (the crate's `source` and `checksum` lines go) while it is used.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(awk '/^name = "cubecl-spirv"$/ {getline; gsub(/[^0-9.]/, "", $0); print; exit}' Cargo.lock)
patch_file=patches/cubecl-spirv-$version-shared-memory.patch
[ -f "$patch_file" ] || { echo "no $patch_file for the cubecl-spirv $version that Cargo.lock names" >&2; exit 1; }
# The crate's source as Cargo downloaded it (fetched first when it is not there yet).
registry=${CARGO_HOME:-$HOME/.cargo}/registry/src
src=$(compgen -G "$registry/*/cubecl-spirv-$version" | head -1) || { cargo fetch -q >&2; src=$(compgen -G "$registry/*/cubecl-spirv-$version" | head -1); }
dest=${ODPO_CACHE:-$HOME/.cache/odpo}/patched/cubecl-spirv-$version
stamp=$(sha256sum "$patch_file" | cut -d' ' -f1)
if [ "$(cat "$dest/.odpo-patch" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$dest.tmp" && mkdir -p "$(dirname "$dest")" && cp -r "$src" "$dest.tmp"
  patch -s -d "$dest.tmp" -p1 < "$patch_file" >&2
  echo "$stamp" > "$dest.tmp/.odpo-patch"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
fi
echo "--config patch.crates-io.cubecl-spirv.path=\"$dest\" --config env.ODPO_CUBECL_SPIRV_FIX=\"$stamp\""
