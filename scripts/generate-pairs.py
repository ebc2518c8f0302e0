"""Writes a large preference file in the `jsonl` pair layout, for data-preparation benchmarks:
N pairs over N/50 prompts of 30-80 words, every response distinct (8-30 words and a unique tag).

    python3 scripts/generate-pairs.py 1000000 /tmp/pairs-1m.jsonl   # 485 MB, about 20 s
    cargo xtask data stats --data /tmp/pairs-1m.jsonl --format jsonl \
        --tokenizer ../shared/models/smollm2-135m-instruct
"""
import json
import random
import sys

VOCAB = (
    "the of and to in is was for on that with as by at it from his an were are which this be or has had not "
    "but also they first one their its new after who movie film great bad story plot actor scene music "
    "ending good boring fun long short love hate best worst time"
).split()


def main() -> None:
    n, out = int(sys.argv[1]), sys.argv[2]
    rng = random.Random(0)
    words = lambda lo, hi: " ".join(rng.choice(VOCAB) for _ in range(rng.randint(lo, hi)))
    prompts = [words(30, 80) for _ in range(max(1, n // 50))]
    with open(out, "w") as f:
        for i in range(n):
            row = {"prompt": prompts[i % len(prompts)], "chosen": f"{words(8, 30)} r{i}a", "rejected": f"{words(8, 30)} r{i}b"}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
