"""How a latency comparison reads when other processes want the cores.

Times an original against a pruned model as the allocation's latency judge does (interleaved,
spinning off, ``evaluate.interleaved_latency``), first on the machine as it is, then with
``--busy N`` extra processes that spin on the CPU, and prints for each timing the speed-up by
the medians (SPEC section 9's figure), by each model's fastest run and, at one thread, by the
running thread's CPU time (what the judge reads: ``evaluate.timed_ratio``). A preemption adds
wall time to a run but no CPU time to its thread.

    python tools/bench_latency_load.py ORIGINAL.onnx PRUNED.onnx --busy 2 --out result.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.common import commit_id, write_json  # noqa: E402


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def timings(original, pruned, batches: list[int], repeats: int, runs: int) -> list[dict]:
    from onnx_ocnna.evaluate import interleaved_latency

    rows = []
    for batch in batches:
        for _ in range(repeats):
            row = interleaved_latency(original, pruned, batch, 1, runs=runs)
            rows.append({**row, "load_average": os.getloadavg()[0]})
            cpu = (f"; CPU time {row['before_cpu_ms']:.2f} -> {row['after_cpu_ms']:.2f} ms, {row['speedup_cpu']:.2f}x"
                   if "speedup_cpu" in row else "; no CPU time (a thread pool)")
            print(f"  b{batch}: medians {row['before_ms']:.2f} -> {row['after_ms']:.2f} ms, {row['speedup']:.2f}x; "
                  f"fastest runs {row['before_min_ms']:.2f} -> {row['after_min_ms']:.2f} ms, "
                  f"{row['speedup_fastest']:.2f}x{cpu}  (load {rows[-1]['load_average']:.1f})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original")
    parser.add_argument("pruned")
    parser.add_argument("--busy", type=int, default=2, help="spinning processes added for the second part")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20, help="runs per model per timing (the judge uses 20)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import onnx

    original, pruned = onnx.load(args.original), onnx.load(args.pruned)
    batches = [int(b) for b in args.batches.split(",")]
    result = {"commit": commit_id(), "date": time.strftime("%Y-%m-%d"), "original": args.original,
              "pruned": args.pruned, "cores": os.cpu_count(), "runs": args.runs, "parts": {}}
    print(f"as the machine is (load {os.getloadavg()[0]:.1f}):")
    result["parts"]["as is"] = timings(original, pruned, batches, args.repeats, args.runs)
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for process in spinners:
        process.start()
    try:
        time.sleep(1.0)
        print(f"with {args.busy} spinning process(es) added:")
        result["parts"][f"{args.busy} busy"] = timings(original, pruned, batches, args.repeats, args.runs)
    finally:
        stop.set()
        for process in spinners:
            process.join(timeout=5)
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
