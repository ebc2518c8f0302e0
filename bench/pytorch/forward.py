#!/usr/bin/env python3
"""PyTorch CPU forward-throughput baseline at SmolLM2-135M shapes.

    python3 bench/pytorch/forward.py [--threads 2] [--batch 8] [--seq 128] [--repeats 5]

Builds LlamaForCausalLM from ../shared/models/smollm2-135m-instruct/config.json with random
weights (float32, eval, torch.no_grad), runs 2 warm-up forwards and then `--repeats` timed
forwards of a [batch, seq] batch of random token ids (full attention mask), and prints one JSON
object: median/min/max tokens per second (batch*seq / seconds per forward) and peak RSS.
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
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(ROOT, "..", "shared", "models", "smollm2-135m-instruct", "config.json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa or eager)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig.from_json_file(args.config)
    cfg._attn_implementation = args.attn
    model = LlamaForCausalLM(cfg).float().eval().to(args.device)
    n_params = sum(p.numel() for p in model.parameters())

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    tokens = args.batch * args.seq

    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            _ = out.logits[0, 0, 0].item()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)

    tps = [tokens / t for t in times]
    print(json.dumps({
        "bench": "pytorch_forward",
        "model": "smollm2-135m shapes, random weights, float32",
        "params": n_params,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "attn_implementation": args.attn,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "tokens_per_s_median": statistics.median(tps),
        "tokens_per_s_min": min(tps),
        "tokens_per_s_max": max(tps),
        "seconds_per_forward_median": statistics.median(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
    }, indent=2))


if __name__ == "__main__":
    main()
