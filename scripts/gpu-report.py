#!/usr/bin/env python3
"""The GPU check's records and tables (scripts/gpu-check.sh).

    gpu-report.py RECORDS_DIR OUT_DIR      merge every stage record into OUT_DIR/gpu-check.json and
                                           write the tables to OUT_DIR/gpu-check.md (and stdout)
    gpu-report.py --merge bench MODEL SIDE STEP_JSON MEM_JSON
                                           one benchmark row: the step's JSON (`odpo bench` or
                                           bench/pytorch/step.py) with bench/gpu_peak.py's memory
    gpu-report.py --merge run BACKEND METRICS_JSONL SECONDS
                                           one training run's losses and held-out metrics
    gpu-report.py --merge census MODEL SIDE STEP_JSON
                                           the kernels of one step (`odpo bench --kernel-times`,
                                           bench/pytorch/step.py --kernels)
    gpu-report.py --merge routines MODEL BACKEND STEP_JSON
                                           each matmul routine timed on a step's products
                                           (`odpo bench --matmul-routines`)
    gpu-report.py --best-routine STEP_JSON the fastest routine that took every product and agrees
                                           with `auto` (what the step then runs with), or `auto`
"""
import glob
import json
import os
import sys

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (SXM parts where both exist).
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0}


def load(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def merge_bench(model, side, step_path, mem_path):
    step = load(step_path, {}) or {}
    mem = load(mem_path, {}) or {}
    row = {"stage": "bench", "model": model, "side": side, "status": mem.get("status")}
    keep = ["tokens_per_s", "seconds_per_step_median", "seconds_per_step_min", "seconds_per_step_max", "step_gflop",
            "achieved_gflops", "phase_seconds_median", "params", "pairs", "seq", "dtype", "peak_rss_mib",
            "gpu_peak_allocated_mib", "gpu_peak_reserved_mib", "torch", "transformers", "device", "flop_utilisation",
            "kernel_paths"]
    row.update({k: step[k] for k in keep if k in step})
    for k in ["gpu_peak_mib", "gpu_baseline_mib"]:
        if k in mem:
            row[k] = mem[k]
    if not step:
        row["error"] = "no result (see gpu-check.log)"
    return row


def merge_run(backend, metrics_path, seconds):
    rows = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    rec = {"stage": "run", "backend": backend, "seconds": float(seconds), "steps": train[-1]["step"] if train else 0,
           "train_loss": [[r["step"], r.get("loss")] for r in train]}
    for name in ["loss", "rewards/accuracies", "rewards/margins", "offset/satisfied"]:
        rec["eval_" + name.replace("/", "_")] = [[r["step"], r.get(name)] for r in evals]
    if not rows:
        rec["error"] = "no metrics (see gpu-check.log)"
    return rec


def merge_census(model, side, step_path):
    step = load(step_path, {}) or {}
    rec = {"stage": "census", "model": model, "side": side}
    if isinstance(step.get("census"), dict):
        rec.update(step["census"])
        rec["seconds_per_step_median"] = step.get("seconds_per_step_median")
    else:
        rec["error"] = "no census (see gpu-check.log)"
    return rec


def merge_routines(model, backend, step_path):
    step = load(step_path, {}) or {}
    rec = {"stage": "routines", "model": model, "backend": backend}
    if isinstance(step.get("matmul_routines"), dict):
        rec.update(step["matmul_routines"])
    else:
        rec["error"] = "no routine timings (see gpu-check.log)"
    return rec


def best_routine(step_path):
    """The fastest routine that ran every product within bf16 rounding of `auto` (2^-7 of the
    largest entry; the products' own rounding is 2^-8), else `auto`."""
    report = (load(step_path, {}) or {}).get("matmul_routines") or {}
    ok = [r for r in report.get("routines", []) if r["refused"] == 0 and r["max_relative_difference"] <= 2 ** -7]
    return min(ok, key=lambda r: r["step_seconds"])["routine"] if ok else "auto"


def table(out, *columns):
    """Starts a markdown table in `out`: a blank line, the header and its rule."""
    out.append("")
    out.append("| " + " | ".join(columns) + " |")
    out.append("|" + "---|" * len(columns))


def fmt(x, spec=".3g", none="-"):
    return none if x is None else format(x, spec)


def tables(records):
    machine = next((r for r in records if r.get("stage") == "machine"), {})
    out = []
    gpu = machine.get("gpu", "no GPU")
    out.append(f"GPU check on {gpu}, {machine.get('date', '?')}: torch {machine.get('torch', '-')}, "
               f"transformers {machine.get('transformers', '-')}, CUDA {machine.get('cuda', '-')}, {machine.get('cpus', '?')} CPUs")
    peak = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in gpu), None)
    measured = machine.get("bf16_matmul_tflops")
    if peak or measured:
        out.append(f"bf16 peak: datasheet {fmt(peak, '.0f')} TFLOP/s, measured 8192^3 matmul {fmt(measured, '.0f')} TFLOP/s")
    out.append("")
    out.append("| conformance | passed | failed | seconds | failures |")
    out.append("|---|---|---|---|---|")
    for r in records:
        if r.get("stage") == "conformance":
            if r.get("skipped"):
                out.append(f"| {r['backend']} | skipped | | | |")
            else:
                fails = ", ".join(r.get("failures") or []) or ("-" if r.get("rc") == 0 else f"exit {r.get('rc')}")
                out.append(f"| {r['backend']} | {r.get('passed')} | {fmt(r.get('failed'), 'd')} | {r.get('seconds')} | {fails} |")
    out.append("")
    benches = [r for r in records if r.get("stage") == "bench"]
    if benches:
        out.append("| model | side | dtype | tokens/s | s/step (min-max) | MFU (datasheet) | MFU (measured) | GPU peak MiB (NVML) | tokens/s vs PyTorch | memory vs PyTorch |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in benches:
            if r.get("skipped") or "tokens_per_s" not in r:
                why = "skipped" if r.get("skipped") else f"failed (exit status {r.get('status')}; see gpu-check.log)"
                out.append(f"| {r['model']} | {r['side']} | | {why} | | | | | | |")
                continue
            ref = next((p for p in benches if p["model"] == r["model"] and p["side"] == "pytorch" and "tokens_per_s" in p), None)
            flops = r["step_gflop"] * 1e9 / r["seconds_per_step_median"]
            mfu = lambda p: f"{100 * flops / (p * 1e12):.1f}%" if p else "-"  # noqa: E731
            ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
            mem = f"{r['gpu_peak_mib'] / ref['gpu_peak_mib']:.2f}x" if ref and r.get("gpu_peak_mib") and ref.get("gpu_peak_mib") else "-"
            out.append(f"| {r['model']} | {r['side']} | {r.get('dtype', '-')} | {r['tokens_per_s']:.0f} | "
                       f"{r['seconds_per_step_median']:.3f} ({r['seconds_per_step_min']:.3f}-{r['seconds_per_step_max']:.3f}) | "
                       f"{mfu(peak)} | {mfu(measured)} | {fmt(r.get('gpu_peak_mib'), '.0f')} | {ratio} | {mem} |")
        out.append("")
        # Where each step's time goes: the medians of its phases, and each side's against PyTorch's
        # (above 1x: the side takes longer).
        phases = ["reference", "policy_forward", "backward", "optimizer"]
        timed = [r for r in benches if isinstance(r.get("phase_seconds_median"), dict)]
        if timed:
            out.append("| model | side | reference (s) | policy forward (s) | backward (s) | optimizer (s) |")
            out.append("|---|---|---|---|---|---|")
            for r in timed:
                ref = next((p for p in timed if p["model"] == r["model"] and p["side"] == "pytorch"), None)
                cells = []
                for ph in phases:
                    t = r["phase_seconds_median"].get(ph)
                    base = ref["phase_seconds_median"].get(ph) if ref and ref is not r else None
                    vs = f" ({t / base:.2f}x)" if t is not None and base else ""
                    cells.append(fmt(t, ".4f") + vs)
                out.append(f"| {r['model']} | {r['side']} | " + " | ".join(cells) + " |")
            out.append("")
        # Which of odpo's fused paths each odpo step took (its last timed step): a path at 0 that
        # should run (grouped attention, torch's RMSNorm, ...) fell back to the composed form.
        paths = [r for r in benches if isinstance(r.get("kernel_paths"), dict)]
        if paths:
            out.append("| model | side | kernel paths of one step (calls) |")
            out.append("|---|---|---|")
            for r in paths:
                taken = ", ".join(f"{k} {v}" for k, v in r["kernel_paths"].items() if v) or "none"
                out.append(f"| {r['model']} | {r['side']} | {taken} |")
            out.append("")
    runs = [r for r in records if r.get("stage") == "run"]
    if runs:
        # The CPU side runs first (gpu-check.sh: tch, or flex in the dry run).
        cpu = next((r for r in runs if r["backend"] in ("flex", "tch") and r.get("train_loss")), None)
        out.append("| real run | steps | seconds | train loss first -> last | held-out loss start -> end | held-out reward accuracy start -> end | largest loss gap to the CPU, first steps |")
        out.append("|---|---|---|---|---|---|---|")
        for r in runs:
            if r.get("skipped") or not r.get("train_loss"):
                out.append(f"| {r['backend']} | {'skipped' if r.get('skipped') else r.get('error', 'failed')} | | | | | |")
                continue
            tl, el, acc = r["train_loss"], r.get("eval_loss") or [], r.get("eval_rewards_accuracies") or []
            gap = "-"
            if cpu and r is not cpu:
                ours = dict((s, l) for s, l in tl)
                diffs = [abs(ours[s] - l) for s, l in cpu["train_loss"] if s in ours]
                gap = f"{max(diffs):.2e} over {len(diffs)} steps" if diffs else "-"
            span = lambda v: f"{v[0][1]:.4f} -> {v[-1][1]:.4f}" if v else "-"  # noqa: E731
            out.append(f"| {r['backend']} | {r['steps']} | {r['seconds']:.0f} | {span(tl)} | {span(el)} | {span(acc)} | {gap} |")
    ooms = [r for r in records if r.get("stage") == "oom"]
    if ooms:
        table(out, "too large a step", "exit", "an error, no panic", "seconds", "message")
        for r in ooms:
            if r.get("skipped"):
                out.append(f"| {r['backend']} | skipped | | | |")
                continue
            message = (r.get("error") or "-").replace("|", "/")[:300]
            out.append(f"| {r['backend']} | {r['rc']} | {'yes' if r.get('ok') else 'NO'} | {r['seconds']} | {message} |")
    censuses = [r for r in records if r.get("stage") == "census"]
    if censuses:
        # The kernels of one step: what a step that waits on the host pays per launch, and where the
        # device time goes.
        table(out, "kernels of one step", "side", "launches", "distinct kernels", "kernels' device time (s)", "census step (s)", "timed step (s)")
        for r in censuses:
            if r.get("skipped") or "launches_per_step" not in r:
                out.append(f"| {r['model']} | {r['side']} | {'skipped' if r.get('skipped') else r.get('error', 'failed')} | | | | |")
                continue
            out.append(f"| {r['model']} | {r['side']} ({r.get('unit', 'cubecl kernels')}) | {r['launches_per_step']} | {r['kernels']} | "
                       f"{fmt(r.get('device_seconds'), '.4f')} | {fmt(r.get('step_seconds'), '.3f')} | {fmt(r.get('seconds_per_step_median'), '.3f')} |")
        table(out, "side", "kernel (the ten with the most device time)", "launches", "device time (s)")
        for r in censuses:
            for k in (r.get("top") or [])[:10]:
                name = k["kernel"].replace("|", "/")[:90]
                out.append(f"| {r['side']} | `{name}` | {k['launches']} | {fmt(k.get('device_seconds'), '.4f')} |")
        # tch-cuda's kernels are PyTorch's, named alike (CUPTI's records on both sides): kernel by
        # kernel, where the two steps' device time differs most.
        for r in censuses:
            base = next((p for p in censuses if p["side"] == "pytorch" and p["model"] == r["model"] and p.get("top")), None)
            if not r.get("side", "").startswith("tch") or not base or not r.get("top"):
                continue
            ours = {k["kernel"]: k for k in r["top"]}
            theirs = {k["kernel"]: k for k in base["top"]}
            rows = []
            for name in set(ours) | set(theirs):
                a_, b_ = ours.get(name, {}), theirs.get(name, {})
                ta, tb = a_.get("device_seconds") or 0.0, b_.get("device_seconds") or 0.0
                rows.append((ta - tb, name, a_.get("launches", 0), ta, b_.get("launches", 0), tb))
            rows.sort(key=lambda x: (-abs(x[0]), x[1]))
            table(out, f"{r['model']}: kernel, {r['side']} beside pytorch (the fifteen that differ most; of the {len(r['top'])} and {len(base['top'])} listed)",
                  f"{r['side']} launches", f"{r['side']} (s)", "pytorch launches", "pytorch (s)", "difference (s)")
            for d, name, la, ta, lb, tb in rows[:15]:
                out.append(f"| `{name.replace('|', '/')[:110]}` | {la} | {ta:.4f} | {lb} | {tb:.4f} | {d:+.4f} |")
    routines = [r for r in records if r.get("stage") == "routines"]
    if routines:
        # Each matmul routine on the products of one step (`odpo bench --matmul-routines`).
        table(out, "products of one step", "backend", "routine", "products' s/step", "TFLOP/s", "vs auto", "refused", "max difference from auto")
        for r in routines:
            if "routines" not in r:
                why = ("skipped" + (f": {r['why']}" if r.get("why") else "")) if r.get("skipped") else r.get("error", "failed")
                out.append(f"| {r['model']} | {r['backend']} | {why} | | | | | |")
                continue
            for t in r["routines"]:
                out.append(f"| {r['model']} | {r['backend']} | {t['routine']} | {fmt(t['step_seconds'], '.4f')} | {fmt(t['tflops'], '.1f')} | "
                           f"{fmt(t['speedup'], '.2f')}x | {t['refused']} | {fmt(t['max_relative_difference'], '.1e')} |")
            if r.get("incomplete"):
                out.append(f"| {r['model']} | {r['backend']} | (the budget ran out before the other routines) | | | | | |")
        table(out, "product (the ten with the most time on auto)", "model", "per step", "GFLOP", "auto (ms)", "fastest", "its ms")
        for r in routines:
            for p in (r.get("products") or [])[:10]:
                out.append(f"| `{p['product']}` | {r['model']} | {p['per_step']} | {fmt(p['gflop'], '.2f')} | {fmt(p['auto_ms'], '.3f')} | {p['best']} | {fmt(p['best_ms'], '.3f')} |")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--best-routine":
        print(best_routine(sys.argv[2]))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--merge":
        kind, args = sys.argv[2], sys.argv[3:]
        rec = {"bench": merge_bench, "run": merge_run, "census": merge_census, "routines": merge_routines}[kind](*args)
        print(json.dumps(rec))
        return
    records_dir, out_dir = sys.argv[1], sys.argv[2]
    records = [r for r in (load(p) for p in sorted(glob.glob(os.path.join(records_dir, "*.json")))) if r is not None]
    for r in records:
        r.setdefault("stage", "machine")
    with open(os.path.join(out_dir, "gpu-check.json"), "w") as f:
        json.dump(records, f, indent=1)
    text = tables(records)
    with open(os.path.join(out_dir, "gpu-check.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
