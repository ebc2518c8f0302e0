#!/usr/bin/env python3
"""Runs a command and records the peak GPU memory it used, the same way for every framework.

    python3 bench/gpu_peak.py OUT.json -- COMMAND [ARGS ...]

Samples the device's used memory through NVML (nvidia-ml-py, `import pynvml`) every 20 ms while
the command runs; the command's stdout and stderr pass through. Writes to OUT.json the command's
exit status, the used memory before it started, the peak while it ran and their difference
(`gpu_peak_mib`): what the process took from the card, its CUDA context and the framework's
caching allocator included. Run one measured command at a time on the device.
"""
import json
import subprocess
import sys
import threading
import time


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    out, cmd = sys.argv[1], sys.argv[3:]
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        used = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20  # noqa: E731
        baseline = used()
    except Exception as e:  # no NVML (no NVIDIA driver): run the command, record no figure
        print(f"gpu_peak: NVML unavailable ({e}); no GPU memory figure", file=sys.stderr)
        used, baseline = None, None
    peak = [baseline or 0.0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], used())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    if used is not None:
        sampler.start()
    t0 = time.perf_counter()
    status = subprocess.call(cmd)
    seconds = time.perf_counter() - t0
    done.set()
    if used is not None:
        sampler.join()
    record = {"command": cmd, "status": status, "seconds": seconds}
    if used is not None:
        record.update(gpu_baseline_mib=baseline, gpu_used_peak_mib=peak[0], gpu_peak_mib=peak[0] - baseline)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
