#!/usr/bin/env python3
"""PyTorch CPU greedy-generation baseline at SmolLM2-135M shapes.

    python3 bench/pytorch/generate.py [--threads 2] [--batches 1,8] [--prompt 32] [--new 64] [--repeats 3]

LlamaForCausalLM from ../shared/models/smollm2-135m-instruct/config.json with random weights
(float32, eval, no_grad). For each batch size: a random prompt of `--prompt` tokens per row,
model.generate(do_sample=False, max_new_tokens=min_new_tokens=--new, use_cache=True), 1 warm-up
then `--repeats` timed runs. tokens/s counts generated tokens only (batch * new tokens / wall
time, prefill included in the time). Prints one JSON object.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(ROOT, "..", "shared", "models", "smollm2-135m-instruct", "config.json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig.from_json_file(args.config)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).float().eval()
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=args.new,
        min_new_tokens=args.new,
        use_cache=True,
        pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0,
        eos_token_id=cfg.eos_token_id,
        bos_token_id=cfg.bos_token_id,
    )

    results = []
    g = torch.Generator().manual_seed(0)
    for b in [int(x) for x in args.batches.split(",")]:
        ids = torch.randint(3, cfg.vocab_size, (b, args.prompt), generator=g)
        mask = torch.ones_like(ids)
        times = []
        with torch.no_grad():
            for i in range(args.warmup + args.repeats):
                t0 = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
                dt = time.perf_counter() - t0
                assert out.shape == (b, args.prompt + args.new), out.shape
                if i >= args.warmup:
                    times.append(dt)
        tps = [b * args.new / t for t in times]
        results.append({
            "batch": b,
            "tokens_per_s_median": statistics.median(tps),
            "tokens_per_s_min": min(tps),
            "tokens_per_s_max": max(tps),
            "seconds_per_run_median": statistics.median(times),
        })

    print(json.dumps({
        "bench": "pytorch_generate_greedy",
        "model": "smollm2-135m shapes, random weights, float32",
        "threads": args.threads,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "kv_cache": True,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "results": results,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
