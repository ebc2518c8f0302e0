#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine without a Rust toolchain, into BIN_DIR
# (default gpu-bin/, ignored by git): the `odpo` binary with flex and Vulkan, the conformance test
# binaries built for Vulkan, SmolLM2's config.json (shapes only) and `build-root`, the checkout the
# test binaries were compiled in (they read their fixtures from there; gpu-check.sh links it).
# Everything is gzipped to stay under the 64 MiB a device run carries.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-bin}
mkdir -p "$OUT"
TARGET=${CARGO_TARGET_DIR:-target}

cargo build --release -p odpo-cli --no-default-features --features flex,vulkan
gzip -c "$TARGET/release/odpo" > "$OUT/odpo.gz"

# One `cargo test` over the three packages (one feature set, one build), as `xtask conformance` does.
cargo test --profile conformance -p odpo-model -p odpo-loss -p odpo-trainer --no-default-features --features vulkan \
  --no-run --message-format=json \
  --test parity --test parity_neo --test pytorch_parity --test gradients \
  --test conformance --test shared_prompt --test data_parallel --test mixed_precision \
  | python3 -c '
import json, sys, shutil, gzip
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        with open(m["executable"], "rb") as src, gzip.open(sys.argv[1] + "/" + m["target"]["name"] + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
' "$OUT"

cp "${ODPO_SHARED:-../shared}/models/smollm2-135m-instruct/config.json" "$OUT/smollm2-config.json" 2>/dev/null \
  || echo "note: no SmolLM2 config.json under ODPO_SHARED; the benchmarks will be skipped" >&2
pwd > "$OUT/build-root"
du -sh "$OUT"
