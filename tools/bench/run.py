"""Benchmark onnx-ocnna against onnxsim and Torch-Pruning on the shared CIFAR ResNets.

    python tools/bench/run.py                       # the full run (see --help for the knobs)
    python tools/bench/run.py --models resnet20 --kd-epochs 0 --targets 0.6   # a quick look

For every model and remaining-parameter target R, every method prunes the model (in its own
process, for its wall time and peak memory) to RPR <= R; each pruned model is measured on a
fixed class-balanced subset of the CIFAR-10 test images (top-1, ONNX Runtime latency with
interleaved before/after runs), then distilled with the same budget (api.distill, teacher = the
original) and measured again. Results go to docs/results/peers_<model>.json after every row;
the tables in docs/benchmarks.md are regenerated from those files at the end of each model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402

from bench.common import (REPO, SHARED, cifar_subset, commit_id, error_text, interleaved_latency,  # noqa: E402
                          load_arrays, model_path, top1, write_json)

FORMAT = "onnx-ocnna-bench"

BLOCK_INTERNAL = ["/conv1/Conv", "*/conv2/Conv"]
# (name, tool, job fields). Names are the row labels in the tables (no commas: --methods splits on them).
METHODS: list[tuple[str, str, dict]] = [
    # The README's recommended command: measured allocation of the budget + reconstruction.
    ("onnx-ocnna default", "onnx-ocnna", {"criterion": "ocnna", "default": True}),
    # The same recipe ranking channels by group-l2 (every weight a channel owns) instead of OCNNA.
    ("onnx-ocnna group-l2", "onnx-ocnna", {"criterion": "group-l2", "default": True}),
    ("ocnna", "onnx-ocnna", {"criterion": "ocnna"}),
    ("ocnna --invert", "onnx-ocnna", {"criterion": "ocnna", "criterion_options": {"invert": True}}),
    ("l1", "onnx-ocnna", {"criterion": "l1"}),
    ("si", "onnx-ocnna", {"criterion": "si"}),
    ("random", "onnx-ocnna", {"criterion": "random", "criterion_options": {"seed": 0}}),
    # The residual spine (stem Conv and every block's second Conv) kept whole, as the peers do.
    ("ocnna (block-internal)", "onnx-ocnna", {"criterion": "ocnna", "exclude": BLOCK_INTERNAL}),
    ("l1 (block-internal)", "onnx-ocnna", {"criterion": "l1", "exclude": BLOCK_INTERNAL}),
    # Least-squares reconstruction of the pruned layers on the 512 calibration images (no training).
    ("ocnna + reconstruct", "onnx-ocnna", {"criterion": "ocnna", "reconstruct": True}),
    ("apply_structured_pruning", "onnxsim", {"function": "apply_structured_pruning"}),
    ("apply_structured_wanda_pruning", "onnxsim", {"function": "apply_structured_wanda_pruning"}),
    ("GroupMagnitude (all groups)", "torch-pruning", {"scope": "all"}),
    ("GroupMagnitude (block-internal)", "torch-pruning", {"scope": "block-internal"}),
]
SWEEPS = [("ocnna", {}), ("ocnna --invert", {"invert": True})]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet20,resnet20-bn,resnet56,resnet56-bn",
                   help="comma list of resnet20, resnet20-bn, resnet56, resnet56-bn (default: %(default)s)")
    p.add_argument("--targets", default="0.8,0.6,0.4", help="remaining-parameter ratios (default: %(default)s)")
    p.add_argument("--methods", default=None, help="comma list of method names to run (default: all)")
    p.add_argument("--calib-samples", type=int, default=512, help="training images for scoring")
    p.add_argument("--train-samples", type=int, default=5000, help="training images for distillation")
    p.add_argument("--eval-samples", type=int, default=2000, help="held-out test images")
    p.add_argument("--kd-epochs", type=int, default=1, help="distillation epochs; 0 skips distillation")
    p.add_argument("--kd-lr", type=float, default=0.01)
    p.add_argument("--kd-models", default="resnet20,resnet20-bn,resnet56,resnet56-bn",
                   help="models whose rows are also distilled (default: %(default)s)")
    p.add_argument("--kd-bn", choices=["frozen", "recompute", "train"], default="frozen",
                   help="BatchNorm mode of every row's distillation (default frozen: the published rows were "
                        "measured so; the library's own default is train)")
    p.add_argument("--latency-runs", type=int, default=30)
    p.add_argument("--sweep-models", default="resnet20,resnet56", help="models that get the k sweep ('' for none)")
    p.add_argument("--sweep-percentiles", default="0,10,20,30,40,50,60,70,80")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "onnx-ocnna-bench",
                   help="decoded data, pruned models and worker files (default: %(default)s)")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--resume", action="store_true", help="keep finished rows of matching earlier results")
    p.add_argument("--worker-timeout", type=float, default=1800.0)
    p.add_argument("--remeasure-latency", action="store_true",
                   help="only measure the latency of the pruned models of the existing results again")
    return p.parse_args(argv)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus_usable": len(os.sched_getaffinity(0)), "cpu": "", "memory_gib": None}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("onnx-ocnna", "onnx", "onnxruntime", "torch", "numpy", "onnxsim", "torch-pruning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    try:
        import torch_pruning

        out["torch_pruning.__version__"] = torch_pruning.__version__  # the module's own, which can differ
    except ImportError:
        pass
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "onnx_ocnna"], capture_output=True, text=True)
    out["onnx-ocnna commit"] = commit_id() + (" (library files modified)" if dirty.stdout.strip() else "")
    return out


def run_worker(job: dict, work: Path, timeout: float) -> dict:
    """Run one tool job in a fresh interpreter; a crash or timeout becomes the job's error."""
    job_path = work / "jobs" / f"{job['name']}.json"
    result_path = work / "jobs" / f"{job['name']}.result.json"
    job_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps(job))
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("worker.py")), str(job_path), str(result_path)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "targets": {}}
    (work / "jobs" / f"{job['name']}.log").write_text(proc.stdout + proc.stderr)
    if not result_path.exists():
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or [f"exit code {proc.returncode}"]
        return {"error": f"worker died: {last[0][:300]}", "targets": {}}
    result = json.loads(result_path.read_text())
    result["process_s"] = time.perf_counter() - start
    return result


def settings_of(args: argparse.Namespace) -> dict:
    return {"targets": [float(t) for t in args.targets.split(",")], "calib_samples": args.calib_samples,
            "train_samples": args.train_samples, "eval_samples": args.eval_samples, "kd_epochs": args.kd_epochs,
            "kd_lr": args.kd_lr, "latency_runs": args.latency_runs, "latency_batches": [1, 32],
            "latency_threads": [1, 2], "calib_seed": 0, "train_seed": 1, "eval_seed": 0,
            **({"kd_bn": args.kd_bn} if args.kd_bn != "frozen" else {})}


def bench_model(key: str, args: argparse.Namespace, data: dict[str, Path]) -> None:
    settings = settings_of(args)
    if key not in args.kd_models.split(","):
        settings["kd_epochs"] = 0
    path = args.results / f"peers_{key}.json"
    previous = json.loads(path.read_text()) if args.resume and path.exists() else None
    if previous and previous.get("settings") != settings:
        print(f"[{key}] settings differ from {path}; starting afresh")
        previous = None
    model = onnx.load(model_path(key))
    test = load_arrays(data["test"])
    from onnx_ocnna.metrics import model_stats

    base_stats = model_stats(model)
    base_top1, base_pred = top1(model, test)
    results = previous or {
        "format": FORMAT, "version": 1, "model": key, "file": model_path(key).name, "settings": settings,
        "machine": machine(), "versions": versions(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_start": os.getloadavg(), "command": " ".join([Path(sys.executable).name] + sys.argv),
        "base": {"top1": base_top1, "parameters": base_stats.parameters, "macs": base_stats.macs},
        "tools": {}, "rows": [], "sweeps": {}}
    if previous:
        results.setdefault("resumed_with", []).append(" ".join([Path(sys.executable).name] + sys.argv))
    order = [name for name, _, _ in METHODS]

    def save() -> None:
        results["rows"].sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else len(order),
                                            -r["target"], r["kd"]))
        write_json(path, results)

    out_dir = args.work / "models" / key
    out_dir.mkdir(parents=True, exist_ok=True)
    common_job = {"model": str(model_path(key)), "calib": str(data["calib"]), "out_dir": str(out_dir),
                  "targets": settings["targets"]}

    if "reference" not in results:
        results["reference"] = run_worker({**common_job, "tool": "ort-pass", "name": f"{key}_ort-pass"},
                                          args.work, args.worker_timeout)
        save()
    wanted = None if args.methods is None else set(args.methods.split(","))
    for name, tool, fields in METHODS:
        if wanted is not None and name not in wanted:
            continue
        job_name = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{key}_{tool}_{name}").strip("_")
        tool_result = results["tools"].get(name)
        if tool_result is None or not all(Path(t["path"]).exists() for t in tool_result["targets"].values() if "path" in t):
            print(f"[{key}] {tool} {name}: pruning", flush=True)
            tool_result = run_worker({**common_job, **fields, "tool": tool, "name": job_name}, args.work,
                                     args.worker_timeout)
            # Rows of one file can come from several runs (--resume): each tool says which code made it.
            tool_result["commit"] = versions()["onnx-ocnna commit"]
            tool_result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            results["tools"][name] = tool_result
            results["rows"] = [r for r in results["rows"] if r["method"] != name]
            save()
        for target in settings["targets"]:
            for kd in ([False, True] if settings["kd_epochs"] else [False]):
                if any(r["method"] == name and r["target"] == target and r["kd"] == kd for r in results["rows"]):
                    continue
                row = measure_row(name, tool, target, kd, tool_result, model, test, base_top1, base_pred,
                                  base_stats, data, args, results)
                results["rows"].append(row)
                save()
                status = row.get("error") or f"RPR {row['rpr']:.3f} top-1 {100 * row['top1_after']:.2f} %"
                print(f"[{key}] {name} R={target} kd={kd}: {status}", flush=True)

    if key in [m for m in args.sweep_models.split(",") if m]:
        run_sweeps(key, model, data, args, results, save)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["load_average_end"] = os.getloadavg()
    save()


def measure_row(name, tool, target, kd, tool_result, model, test, base_top1, base_pred, base_stats, data, args,
                results) -> dict:
    row = {"method": name, "tool": tool, "target": target, "kd": kd, "top1_before": base_top1}
    cell = tool_result["targets"].get(str(target)) or {"error": tool_result.get("error", "no result")}
    row.update(setting=cell.get("setting"), tool_s=cell.get("tool_s"), search_s=cell.get("search_s"),
               peak_rss_mib=tool_result.get("peak_rss_mib"), ready_rss_mib=tool_result.get("ready_rss_mib"))
    if "error" in cell:
        row["error"] = cell["error"]
        return row
    from onnx_ocnna.metrics import model_stats

    try:
        pruned = onnx.load(cell["path"])
        stats = model_stats(pruned)
        row.update(rpr=stats.parameters / base_stats.parameters, macs_ratio=stats.macs / base_stats.macs,
                   parameters=stats.parameters, macs=stats.macs)
        if kd:
            from onnx_ocnna import api

            train = load_arrays(data["train"])
            start = time.perf_counter()
            pruned, report = api.distill(pruned, model, train, epochs=args.kd_epochs, lr=args.kd_lr, bn=args.kd_bn,
                                         calibration_options={"batch_size": 64}, progress=False, seed=0)
            row["kd_s"] = time.perf_counter() - start
            row["kd_threads"] = report.settings.get("threads")
        row["top1_after"], pred = top1(pruned, test)
        row["drop_pt"] = 100 * (base_top1 - row["top1_after"])
        row["agreement"] = float((pred == base_pred).mean())
        if kd:  # distillation changes weights, not shapes: the latency is the un-distilled row's
            same = [r for r in results["rows"] if r["method"] == name and r["target"] == target and not r["kd"]]
            row["latency"] = same[0].get("latency") if same else None
        else:
            row["latency"] = [interleaved_latency(model, pruned, b, t, runs=args.latency_runs)
                              for t in (1, 2) for b in (1, 32)]
    except Exception as exc:  # noqa: BLE001 - the error goes into the row's cells
        row["error"] = error_text(exc)
    return row


def remeasure_latency(key: str, args: argparse.Namespace) -> None:
    """Measure every pruned model's latency again (e.g. after a change of the method)."""
    path = args.results / f"peers_{key}.json"
    results = json.loads(path.read_text())
    model = onnx.load(model_path(key))
    for row in results["rows"]:
        if row["kd"] or row.get("error") or row.get("rpr") is None:
            continue
        cell = results["tools"][row["method"]]["targets"][str(row["target"])]
        pruned = onnx.load(cell["path"])
        row["latency"] = [interleaved_latency(model, pruned, b, t, runs=args.latency_runs)
                          for t in (1, 2) for b in (1, 32)]
        for kd_row in results["rows"]:
            if kd_row["kd"] and kd_row["method"] == row["method"] and kd_row["target"] == row["target"]:
                kd_row["latency"] = row["latency"]
        write_json(path, results)
        print(f"[{key}] {row['method']} R={row['target']}: "
              + " ".join(f"{x['speedup']:.2f}" for x in row["latency"]), flush=True)
    results.setdefault("resumed_with", []).append(" ".join([Path(sys.executable).name] + sys.argv))
    results["latency_measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["load_average_latency_end"] = os.getloadavg()
    write_json(path, results)


def run_sweeps(key: str, model: onnx.ModelProto, data: dict[str, Path], args, results: dict, save) -> None:
    from onnx_ocnna.sweep import run_sweep

    ks = [float(k) for k in args.sweep_percentiles.split(",")]
    for name, options in SWEEPS:
        if name in results["sweeps"]:
            continue
        slug = name.replace(" --", "-")
        png = REPO / "docs" / f"sweep_{key}_{slug}.png"
        start = time.perf_counter()
        try:
            rows = run_sweep(model, load_arrays(data["calib"]), load_arrays(data["test"]), ks, criterion="ocnna",
                             criterion_options=options, calibration_options={"batch_size": 64},
                             out_png=png, out_csv=args.work / f"sweep_{key}_{slug}.csv",
                             title=f"{key}: OCNNA{' (inverted ranking)' if options else ''}, no fine-tuning, "
                                   f"{args.eval_samples} test images")
            results["sweeps"][name] = {"png": str(png.relative_to(REPO)), "rows": rows,
                                       "seconds": time.perf_counter() - start}
        except Exception as exc:  # noqa: BLE001
            results["sweeps"][name] = {"error": error_text(exc)}
        save()
        print(f"[{key}] sweep {name}: {results['sweeps'][name].get('error') or 'done'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (SHARED / "models").is_dir():
        print(f"shared data not found at {SHARED}; set OCNNA_SHARED_DATA", file=sys.stderr)
        return 2
    started = time.perf_counter()
    cache = args.work / "data"
    data = {"calib": cifar_subset("train", args.calib_samples, 0, cache),
            "train": cifar_subset("train", args.train_samples, 1, cache, shuffle=True),
            "test": cifar_subset("test", args.eval_samples, 0, cache)}
    from bench.tables import update_doc

    for key in [m for m in args.models.split(",") if m]:
        print(f"== {key}", flush=True)
        if args.remeasure_latency:
            remeasure_latency(key, args)
        else:
            bench_model(key, args, data)
        update_doc(args.results, args.doc)
    print(f"total {time.perf_counter() - started:.0f} s; tables in {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
