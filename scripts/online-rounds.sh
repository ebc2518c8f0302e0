#!/usr/bin/env bash
# Online rounds against one offline round on the built-in task, at equal compute: ODPO on the same 400
# preference prompts as one round of 400 pairs, or four rounds of 100 (each sampling the policy it
# starts from), the reference kept at the SFT model (`initial`) or moved to each round's start
# (`previous`); SEEDS seeds each (default 5). Every round trains `pref.epochs` = 4 passes over its
# pairs, so the three settings take the same number of optimizer steps and samples.
#
#   scripts/online-rounds.sh [SEEDS]        # runs in runs/online-*, prints a Markdown table
#
# PYTHON (default python3) reads the runs' summary.json files.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-5}
cargo build --release -p odpo-cli --quiet
odpo="${CARGO_TARGET_DIR:-target}/release/odpo"
for ((s = 0; s < seeds; s++)); do
    for setting in "r1:pref.rounds=1" "r4-initial:pref.rounds=4" "r4-previous:pref.rounds=4 pref.round_reference=\"previous\""; do
        name=${setting%%:*}
        sets=()
        for kv in ${setting#*:}; do sets+=(--set "$kv"); done
        dir="runs/online-$name-s$s"
        [ -f "$dir/summary.json" ] && continue
        rm -rf "$dir"
        "$odpo" train --set "name=\"online-$name-s$s\"" --set "seed=$s" "${sets[@]}" >/dev/null 2>&1 || { echo "run $dir failed" >&2; exit 1; }
    done
done
"${PYTHON:-python3}" - "$seeds" <<'PY'
import json, statistics, sys
seeds = int(sys.argv[1])
print("| setting | reward (mean ± sd over seeds) | KL seq (mean ± sd) | reward per run | KL per run |")
print("|---|---|---|---|---|")
for name, label in [("r1", "1 round × 400 prompts"), ("r4-initial", "4 rounds × 100, reference SFT"), ("r4-previous", "4 rounds × 100, reference moves")]:
    rs, ks = [], []
    for s in range(seeds):
        p = json.load(open(f"runs/online-{name}-s{s}/summary.json"))["eval"]["policy"]
        rs.append(p["reward"]["mean"]); ks.append(p["kl"]["seq"]["mean"])
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    print(f"| {label} | {statistics.mean(rs):.3f} ± {sd(rs):.3f} | {statistics.mean(ks):.2f} ± {sd(ks):.2f} | {' '.join(f'{r:.2f}' for r in rs)} | {' '.join(f'{k:.1f}' for k in ks)} |")
PY
