#!/usr/bin/env bash
# Every numeric key of a model fixture's config.json set to 0, 1, 3, 7 and -1 in turn, each run
# through `odpo bench` (one step of random weights): each must reach a step or a clear error, never
# a panic (docs/models.md, "Checkpoints"). Prints a line per error and per panic; exits 1 if any
# run panicked.
#   scripts/model-config-fuzz.sh PATH/TO/odpo CASE [CASE ...]    (CASE: a folder of
#   crates/odpo-model/tests/fixtures, e.g. olmo2)
set -uo pipefail
fixtures=$(cd "$(dirname "$0")/../crates/odpo-model/tests/fixtures" && pwd)
odpo=$1
shift
panics=0
for case in "$@"; do
  cfg=$fixtures/$case/config.json
  keys=$(python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
print(" ".join(k for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)))' "$cfg")
  for key in $keys; do
    for val in 0 1 3 7 -1; do
      d=$(mktemp -d)
      python3 -c 'import json, sys
d = json.load(open(sys.argv[1])); d[sys.argv[2]] = int(sys.argv[3])
json.dump(d, open(sys.argv[4], "w"))' "$cfg" "$key" "$val" "$d/config.json"
      out=$(timeout 300 "$odpo" bench --config "$d/config.json" --pairs 1 --seq 8 --warmup 0 --repeats 1 2>&1)
      rc=$?
      if grep -q "panicked" <<<"$out"; then
        panics=$((panics + 1))
        echo "PANIC $case $key=$val: $(grep -m1 panicked <<<"$out")"
      elif [ $rc -ne 0 ]; then
        echo "error $case $key=$val (status $rc): $(tail -1 <<<"$out" | sed "s|$d/||")"
      fi
      rm -rf "$d"
    done
  done
done
echo "$panics panics"
[ "$panics" -eq 0 ]
