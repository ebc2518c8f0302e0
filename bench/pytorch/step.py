#!/usr/bin/env python3
"""PyTorch reference of one ODPO training step, written the way TRL's DPOTrainer runs it.

    python3 bench/pytorch/step.py --config bench/configs/smollm2-135m.json \
        [--pairs 4] [--seq 128] [--threads 2] [--repeats 5] [--warmup 2] [--lora RANK] [--device cpu] [--dtype bf16] \
        [--cached-reference] [--gradient-checkpointing] [--wpo]

One step: chosen and rejected concatenated into one [2*pairs, seq] batch, a policy forward with
per-token log-probs (log_softmax + gather over the completion half of each row), the reference
forward under torch.no_grad() on a frozen copy (with --lora: the same model with the adapters
disabled, as TRL + PEFT do), the ODPO loss -logsigmoid(beta*h - alpha*log(s_w - s_l)), backward,
AdamW (fused, transformers' default optimizer with torch >= 2.8; --optim adamw_torch for the
single-tensor one). Dropout off, as TRL's disable_dropout=True default sets it. Random weights, float32 (--dtype bf16/f16: autocast over the float32 weights, as TRL
trains with bf16=True), transformers' model classes. --gradient-checkpointing: transformers' activation
checkpointing on the policy (non-reentrant), as TRL's gradient_checkpointing=True turns it on; with
--lora the base model's input embeddings are also made to require grad before the adapters wrap it,
as TRL does. --wpo: WPO's pair weights as TRL's use_weighting computes them (per position logsumexp(2 * log_softmax)
under no_grad, the completion's mean of the aligned log-probs, each pair's loss times exp(m_w) * exp(m_l)).
Prints one JSON object with the same fields as `odpo bench`: tokens/s (2*pairs*seq per step), pairs/s, seconds per step
(median/min/max over --repeats after --warmup), peak RSS, the FLOPs of the step and their share of
a float32 matmul peak measured here; on CUDA also torch's peak allocated and reserved GPU memory.
"""
import argparse
import copy
import json
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


def matmul_peak(n: int, device: str, seconds: float = 1.0) -> float:
    """GFLOP/s of an n x n x n float32 matmul, best of a few timed loops."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        iters = 0
        sync(device)
        t0 = time.perf_counter()
        while True:
            a @ b
            iters += 1
            if iters % 4 == 0:
                sync(device)
                dt = time.perf_counter() - t0
                if dt > seconds / 3:
                    break
        best = max(best, 2 * n**3 * iters / dt / 1e9)
    return best


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def kernel_census(run_step, device_type: str, device: str, rows: int = 100) -> dict:
    """One step under torch.profiler: on CUDA the kernels it launched with their device time, on a
    CPU the aten operators that call no other (the ones that do the work), with their own time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        run_step()
        sync(device)
    step_seconds = time.perf_counter() - t0
    tally = {}
    for e in prof.events():
        if device_type == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            secs = e.device_time_total / 1e6
        else:
            if not e.name.startswith("aten::") or any(c.name.startswith("aten::") for c in e.cpu_children):
                continue
            secs = e.self_cpu_time_total / 1e6
        n, t = tally.get(e.name, (0, 0.0))
        tally[e.name] = (n + 1, t + secs)
    top = sorted(tally.items(), key=lambda kv: (-kv[1][1], -kv[1][0], kv[0]))
    return {
        "unit": "CUDA kernels, copies and fills" if device_type == "cuda" else "aten operators that call no other",
        "launches_per_step": sum(n for n, _ in tally.values()),
        "kernels": len(tally),
        "device_seconds": sum(t for _, t in tally.values()),
        "step_seconds": step_seconds,
        "top": [{"kernel": k, "launches": n, "device_seconds": t} for k, (n, t) in top[:rows]],
    }


def step_flops(cfg, model, pairs: int, seq: int) -> float:
    """Matmul FLOPs of a step: (policy forward + backward = 3x) + reference forward (1x), each
    2 * (linear weights incl. the LM head) per token plus the attention products QK^T and AV."""
    n_linear = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n and "wpe" not in n and "embed" not in n)
    if getattr(cfg, "tie_word_embeddings", True):
        n_linear += cfg.vocab_size * (getattr(cfg, "hidden_size", None) or cfg.n_embd)
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    head_dim = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", None) or cfg.n_embd) // heads
    rows = 2 * pairs
    forward = 2 * n_linear * rows * seq + 2 * 2 * layers * heads * head_dim * seq * seq * rows
    return 4.0 * forward


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--cached-reference", action="store_true",
                    help="reference log-probs computed once before the steps (TRL's precompute_ref_log_probs)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens per row (default seq/4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank on every projection (0: full fine-tuning)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32",
                    help="bf16/f16: mixed precision as TRL trains with bf16=True (autocast over f32 weights)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="transformers' gradient checkpointing on the policy (use_reentrant=False), as TRL's "
                         "gradient_checkpointing=True")
    ap.add_argument("--optim", choices=["adamw_torch_fused", "adamw_torch"], default="adamw_torch_fused",
                    help="transformers' optimizer names: its default with torch >= 2.8 is the fused AdamW")
    ap.add_argument("--wpo", action="store_true",
                    help="WPO's pair weights (TRL's use_weighting): the policy's logits also give logsumexp(2 * log p)")
    ap.add_argument("--kernels", action="store_true",
                    help="after the timed steps, profile one more step (torch.profiler): the CUDA kernels it launches "
                         "and their device time, or on a CPU the aten operators that do the work (those that call no "
                         "other); printed under `census`, as `odpo bench --kernel-times` prints its own")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(args.config)
    cfg._attn_implementation = args.attn
    policy = AutoModelForCausalLM.from_config(cfg).float().to(args.device).train()
    # TRL's DPOConfig(disable_dropout=True), its default: every dropout of the model at p = 0, as
    # odpo trains (it has none). GPT-2's configs otherwise drop 10% at the embedding, in each
    # attention and after each block.
    for m in policy.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    flops = step_flops(cfg, policy, args.pairs, args.seq)
    ckpt_kwargs = {"use_reentrant": False}
    if args.lora:
        from peft import LoraConfig, get_peft_model
        if args.gradient_checkpointing:
            # TRL with a peft_config and gradient_checkpointing=True: the base model's embedding output
            # requires grad (needed by reentrant checkpointing, harmless otherwise), then Trainer turns
            # checkpointing on with args.gradient_checkpointing_kwargs.
            policy.enable_input_require_grads()
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        policy = get_peft_model(policy, LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules="all-linear", lora_dropout=0.0))
        reference = None
    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        if args.gradient_checkpointing:
            # Only the policy: TRL's reference model is a separate copy that Trainer never touches.
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    # What TRL gets from transformers' Trainer: `optim="adamw_torch_fused"` by default with torch >= 2.8.
    optim = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.0,
                              fused=args.optim == "adamw_torch_fused")

    g = torch.Generator().manual_seed(0)
    rows = 2 * args.pairs
    ids = torch.randint(3, cfg.vocab_size, (rows, args.seq), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    prompt = args.prompt if args.prompt is not None else args.seq // 4
    loss_mask = torch.zeros(rows, args.seq - 1, device=args.device)
    loss_mask[:, prompt - 1:] = 1.0
    offsets = torch.rand(args.pairs, generator=g).to(args.device)
    beta = 0.7

    amp = {"bf16": torch.bfloat16, "f16": torch.float16}.get(args.dtype)
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"

    def seq_logps(model, ids, mask, wpo=False):
        with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        lp = log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        sums = (lp * loss_mask).sum(-1)
        if not wpo:
            return sums
        with torch.no_grad():
            # TRL's use_weighting: log sum_v p_v^2 per position, the mean aligned log-prob per row.
            log_sum_sq = torch.logsumexp(2 * log_probs, dim=-1)
            means = ((lp - log_sum_sq) * loss_mask).sum(-1) / loss_mask.sum(-1).clamp_min(1)
        return sums, means

    cache = {}
    cache_seconds = None
    if args.cached_reference:
        t0 = time.perf_counter()
        with torch.no_grad():
            if reference is None:
                with policy.disable_adapter():
                    cache["ref"] = seq_logps(policy, ids, mask)
            else:
                cache["ref"] = seq_logps(reference, ids, mask)
        sync(args.device)
        cache_seconds = time.perf_counter() - t0

    def step(marks):
        # marks collects the time at the end of each phase (reference, policy forward + loss,
        # backward + norm, optimizer), with the device synchronised, as the odpo side splits it.
        def mark():
            sync(args.device)
            marks.append(time.perf_counter())
        if "ref" in cache:
            ref = cache["ref"]
        else:
            with torch.no_grad():
                if reference is None:
                    with policy.disable_adapter():
                        ref = seq_logps(policy, ids, mask)
                else:
                    ref = seq_logps(reference, ids, mask)
        mark()
        pol = seq_logps(policy, ids, mask, wpo=args.wpo)
        pol, means = pol if args.wpo else (pol, None)
        h = (pol[: args.pairs] - ref[: args.pairs]) - (pol[args.pairs:] - ref[args.pairs:])
        per_pair = -F.logsigmoid(beta * h - offsets)
        if means is not None:
            per_pair = per_pair * torch.exp(means[: args.pairs]) * torch.exp(means[args.pairs:])
        loss = per_pair.mean()
        mark()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        mark()
        optim.step()
        mark()
        return loss.item()

    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    phases = [[], [], [], []]
    for i in range(args.warmup + args.repeats):
        sync(args.device)
        t0 = time.perf_counter()
        marks = [t0]
        step(marks)
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            for k in range(4):
                phases[k].append(marks[k + 1] - marks[k])
    census = kernel_census(lambda: step([time.perf_counter()]), device_type, args.device) if args.kernels else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    gpu = {}
    if device_type == "cuda":
        gpu = {"gpu_peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
               "gpu_peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
    peak = matmul_peak(1024, args.device)
    med = statistics.median(times)
    tokens = rows * args.seq
    print(json.dumps({
        "bench": "pytorch_step",
        "config": args.config,
        "params": sum(p.numel() for p in policy.parameters()),
        "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "pairs": args.pairs,
        "seq": args.seq,
        "threads": args.threads,
        "optim": args.optim,
        "lora": args.lora,
        "gradient_checkpointing": args.gradient_checkpointing,
        "wpo": args.wpo,
        "repeats": args.repeats,
        "seconds_per_step_median": med,
        "seconds_per_step_min": min(times),
        "seconds_per_step_max": max(times),
        "tokens_per_s": tokens / med,
        "pairs_per_s": args.pairs / med,
        "peak_rss_mib": peak_rss,
        "step_gflop": flops / 1e9,
        "achieved_gflops": flops / med / 1e9,
        "reference_cache_seconds": cache_seconds,
        "later_epoch_over_first": None if cache_seconds is None else med / (med + cache_seconds),
        "phase_seconds_median": dict(zip(["reference", "policy_forward", "backward", "optimizer"],
                                         [statistics.median(p) for p in phases])),
        "matmul_peak_gflops": peak,
        "flop_utilisation": flops / med / 1e9 / peak,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "dtype": args.dtype,
        "census": census,
        **gpu,
    }, indent=2))


if __name__ == "__main__":
    main()
