"""Benchmark: pruning, knowledge distillation and INT8 on the shared CIFAR-10 ResNets.

For each model: held-out top-1 of the original, of the pruned model (no fine-tuning) and of
the distilled model, with RPR, MACs ratio, the distillation budget and its wall time; the
default criterion ``ocnna`` at every ``--ks`` percentile, the other ``--criteria`` at
``--criteria-k``; optionally an INT8 row (the distilled ``ocnna`` model at ``--criteria-k``).

Data (all from ../shared/data/cifar10, chosen once with ``--seed``, per class):
  * training: ``--train-images`` from ``train`` (class-balanced), also the KD data;
  * calibration: the first ``--calib-images`` of those (class-balanced, labelled: SI needs labels);
  * evaluation: ``--test-images`` from ``test`` (class-balanced), the same for every row.

Training order: ``--train-order shuffled`` (default) feeds the decoded training images in a new
seeded permutation every epoch; ``library`` passes the image folder to ``api.distill``, which
reads it in sorted, i.e. class-by-class, order (see docs/benchmarks_kd.md for why that matters).

Results are written after every row to ``--out`` (JSON), so an interrupted run keeps its rows.

    python tools/bench_kd.py --models resnet20 --out docs/results/kd_resnet20.json
    python tools/bench_kd.py --models resnet56 --ks 40 --criteria --epochs 6 --int8 \\
        --out docs/results/kd_resnet56.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.arrays import ArraySource  # noqa: E402
from bench.common import top1_of_source  # noqa: E402
from onnx_ocnna import api, evaluate  # noqa: E402
from onnx_ocnna.calibration import CalibrationSource  # noqa: E402
from onnx_ocnna.quantize import quantize_int8  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODELS = {
    "resnet20": "resnet20_ts_opset13.onnx",
    "resnet56": "resnet56_ts_opset13.onnx",
    "resnet20_bn": "resnet20_ts_opset13_bn.onnx",
    "resnet56_bn": "resnet56_ts_opset13_bn.onnx",
}
# criterion label -> (library criterion, criterion options)
CRITERIA = {
    "ocnna": ("ocnna", {}),
    "ocnna-invert": ("ocnna", {"invert": True}),
    "l1": ("l1", {}),
    "si": ("si", {}),
    "random": ("random", {"seed": 0}),
}
PREPROCESS = "imagenet-32"


def pick_files(root: Path, per_class: list[int], seed: int) -> list[list[tuple[Path, str]]]:
    """Disjoint class-balanced file lists: for each count c in ``per_class``, c files of every
    class, taken in order from one seeded permutation of that class's files."""
    rng = np.random.default_rng(seed)
    picks: list[list[tuple[Path, str]]] = [[] for _ in per_class]
    for cls in sorted(p.name for p in root.iterdir() if p.is_dir()):
        files = sorted((root / cls).glob("*.jpg"))
        order = rng.permutation(len(files))
        start = 0
        for i, count in enumerate(per_class):
            picks[i] += [(files[j], cls) for j in order[start : start + count]]
            start += count
    return picks


def link_folder(files: list[tuple[Path, str]], where: Path) -> Path:
    """An image folder of symlinks (class sub-folders), read by the library's own readers."""
    for path, cls in files:
        (where / cls).mkdir(parents=True, exist_ok=True)
        (where / cls / path.name).symlink_to(path)
    return where


def decode(folder: Path, model: onnx.ModelProto) -> tuple[str, np.ndarray, np.ndarray]:
    """(input name, images [N, 3, H, W] float32, labels [N]) through the library's preprocessing."""
    source = api.as_source(str(folder), model, preprocess=PREPROCESS, batch_size=256)
    batches = list(source.batches())
    name = source.input_names[0]
    return name, np.concatenate([b.feeds[name] for b in batches]), np.concatenate([b.labels for b in batches])


def git_state() -> str:
    """Commit of the repository (with "+dirty" if tracked files differ), or "unknown"."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "onnx_ocnna"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict:
    return {
        "library_commit": git_state(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
        "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "loadavg_start": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet20"], help=f"names ({', '.join(MODELS)}) or .onnx paths")
    ap.add_argument("--ks", nargs="*", type=float, default=[20, 40, 60], help="percentiles for ocnna")
    ap.add_argument("--criteria", nargs="*", default=["ocnna-invert", "l1", "si"], choices=list(CRITERIA))
    ap.add_argument("--criteria-k", type=float, default=40)
    ap.add_argument("--int8", action="store_true", help="quantize the distilled ocnna model at --criteria-k")
    ap.add_argument("--train-images", type=int, default=10000)
    ap.add_argument("--calib-images", type=int, default=1000)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--train-order", choices=["shuffled", "library"], default="shuffled")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    ap.add_argument("--bn", choices=["frozen", "recompute", "train"], default="train",
                    help="BatchNormalization statistics in distillation (see onnx_ocnna.distill.batchnorm)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--scope", choices=["per-group", "global"], default="per-group")
    ap.add_argument("--exclude", nargs="*", default=[], help="globs of groups kept whole (a different method: label it)")
    ap.add_argument("--epoch-eval", action="store_true", help="held-out accuracy after every epoch (costs time)")
    ap.add_argument("--reconstruct", action="store_true",
                    help="least-squares reconstruction of the pruned layers on the calibration images before KD")
    ap.add_argument("--reconstruct-samples", type=int, default=512)
    ap.add_argument("--label", default="", help="free text stored with every row (e.g. 'tuned')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="results JSON (rows are appended to an existing file)")
    ap.add_argument("--summarize", nargs="+", type=Path, metavar="JSON", help="print Markdown tables of result files")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    if args.out is None:
        ap.error("--out is required")

    result = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    run = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "machine": machine(), "rows": []}
    result["runs"].append(run)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory(prefix="bench_kd_") as tmp_name:
        tmp = Path(tmp_name)
        train_files, = pick_files(DATA / "cifar10" / "train", [args.train_images // 10], args.seed)
        test_files, = pick_files(DATA / "cifar10" / "test", [args.test_images // 10], args.seed)
        # Calibration = the first calib/10 training images of every class (a subset of the KD data).
        per_class = args.train_images // 10
        calib_files = [f for i, f in enumerate(train_files) if i % per_class < args.calib_images // 10]
        train_dir = link_folder(train_files, tmp / "train")
        calib_dir = link_folder(calib_files, tmp / "calib")
        test_dir = link_folder(test_files, tmp / "test")

        for name in args.models:
            path = Path(name) if name.endswith(".onnx") else DATA / "models" / MODELS[name]
            teacher = onnx.load(str(path))
            started = time.perf_counter()
            input_name, x_test, y_test = decode(test_dir, teacher)
            test = ArraySource(input_name, x_test, y_test, 250, shuffle=False)
            _, x_train, y_train = decode(train_dir, teacher)
            train = ArraySource(input_name, x_train, y_train, args.batch_size, shuffle=True, seed=args.seed)
            calib = api.as_source(str(calib_dir), teacher, preprocess=PREPROCESS, batch_size=64)
            base, base_pred = top1_of_source(teacher, test)
            print(f"{path.name}: top-1 {base['top1']:.4f} on {len(y_test)} test images "
                  f"(data decoded in {time.perf_counter() - started:.0f} s)", flush=True)
            teacher_path = tmp / "teacher.onnx"
            onnx.save(teacher, str(teacher_path))

            jobs = [("ocnna", k) for k in args.ks] + [(c, args.criteria_k) for c in args.criteria]
            scores_cache: dict[str, api.Scores] = {}
            for label, k in jobs:
                criterion, options = CRITERIA[label]
                row = {"model": path.name, "criterion": label, "k": k, "label": args.label,
                       "exclude": args.exclude, "round_to": args.round_to, "scope": args.scope,
                       "test_images": len(y_test), "calib_images": calib.num_samples, "top1_original": base["top1"]}
                if label not in scores_cache:
                    scores_cache[label] = api.score(teacher, calib, criterion=criterion, criterion_options=options,
                                                    progress=False)
                scores = scores_cache[label]
                t0 = time.perf_counter()
                pruned, report = api.compress(teacher, calib if args.reconstruct else None, percentile=k,
                                              criterion=criterion, criterion_options=options,
                                              scores=scores, round_to=args.round_to, scope=args.scope,
                                              exclude=args.exclude or None, progress=False,
                                              reconstruct=args.reconstruct,
                                              reconstruct_options={"samples": args.reconstruct_samples})
                row.update(rpr=report.rpr, macs_ratio=report.macs_ratio, params=report.after.parameters,
                           score_s=scores.seconds, rewrite_s=time.perf_counter() - t0,
                           reconstruct=args.reconstruct, reconstruct_s=report.timings.get("reconstruct_s"),
                           reconstruct_samples=args.reconstruct_samples if args.reconstruct else None)
                pruned_acc, _ = top1_of_source(pruned, test, base_pred)
                row.update(top1_pruned=pruned_acc["top1"], agreement_pruned=pruned_acc["agreement"])
                print(f"  {label} k={k:g}: RPR {report.rpr:.3f}, MACs {report.macs_ratio:.3f}, "
                      f"pruned top-1 {pruned_acc['top1']:.4f}", flush=True)

                t0 = time.perf_counter()
                train_data = train if args.train_order == "shuffled" else str(train_dir)
                distilled, kd = api.distill(
                    pruned, teacher, train_data, epochs=args.epochs, lr=args.lr, temperature=args.temperature,
                    alpha=args.alpha, augment=not args.no_augment, hflip=True,
                    eval_data=test if args.epoch_eval else None,
                    calibration_options={"preprocess": PREPROCESS, "batch_size": args.batch_size},
                    progress=False, seed=args.seed, optimizer=args.optimizer, bn=args.bn,
                )
                kd_s = time.perf_counter() - t0
                kd_acc, _ = top1_of_source(distilled, test, base_pred)
                row.update(top1_kd=kd_acc["top1"], agreement_kd=kd_acc["agreement"],
                           drop_pruned=100 * (base["top1"] - pruned_acc["top1"]),
                           drop_kd=100 * (base["top1"] - kd_acc["top1"]),
                           epochs=args.epochs, train_images=len(y_train), train_order=args.train_order,
                           lr=args.lr, optimizer=args.optimizer, bn=args.bn, batch_size=args.batch_size,
                           alpha=args.alpha, temperature=args.temperature, kd_s=kd_s,
                           kd_threads=kd.settings.get("threads"), kd_check_max_diff=kd.check_max_diff,
                           kd_initial_top1=kd.initial_accuracy, bn_recomputed_samples=kd.bn_recomputed_samples,
                           kd_bn_recomputed_top1=kd.bn_recomputed_accuracy,
                           history=[{"epoch": e.epoch, "loss": e.loss, "kd_loss": e.kd_loss, "ce_loss": e.ce_loss,
                                     "train_agreement": e.train_agreement, "eval_accuracy": e.eval_accuracy,
                                     "seconds": e.seconds} for e in kd.epochs])
                print(f"    KD {args.epochs} ep x {len(y_train)} img ({kd_s:.0f} s): top-1 {kd_acc['top1']:.4f} "
                      f"(drop {row['drop_kd']:.2f} pt), losses {[round(e.loss, 3) for e in kd.epochs]}", flush=True)

                if args.int8 and label == "ocnna" and k == args.criteria_k:
                    row["int8"] = int8_row(distilled, calib, test, base_pred, teacher, tmp)
                    print(f"    INT8: {row['int8']}", flush=True)
                run["rows"].append(row)
                save()
    print(json.dumps([{k: v for k, v in r.items() if k != "history"} for r in run["rows"]], indent=1))


def int8_row(distilled: onnx.ModelProto, calib: CalibrationSource, test: ArraySource, base_pred: np.ndarray,
             teacher: onnx.ModelProto, tmp: Path) -> dict:
    """File sizes, latency (fp32-pruned vs int8-pruned, and original vs fp32-pruned) and top-1 of the INT8 model."""
    fp32_path, int8_path = tmp / "pruned_fp32.onnx", tmp / "pruned_int8.onnx"
    onnx.save(distilled, str(fp32_path))
    t0 = time.perf_counter()
    quantize_int8(distilled, calib, int8_path)
    seconds = time.perf_counter() - t0
    int8 = onnx.load(str(int8_path))
    acc, _ = top1_of_source(int8, test, base_pred)
    fp32_bytes, int8_bytes = fp32_path.stat().st_size, int8_path.stat().st_size
    return {
        "quantize_s": seconds, "fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes,
        "size_ratio": int8_bytes / fp32_bytes, "top1_int8": acc["top1"], "agreement_int8": acc["agreement"],
        "latency_fp32_vs_int8": evaluate.compare_latency(distilled, int8, batches=(1, 32), threads=(1,), runs=30),
        "latency_original_vs_fp32": evaluate.compare_latency(teacher, distilled, batches=(1, 32), threads=(1,),
                                                             runs=30),
    }


def budget_options(row: dict) -> str:
    """The distillation settings of a row: the rate, then any that differ from the defaults."""
    parts = [f"lr {row['lr']:g}"]
    if row.get("optimizer", "sgd") != "sgd":
        parts.append(row["optimizer"])
    if row.get("bn", "frozen") != "frozen":
        parts.append(f"bn {row['bn']}")
    if row.get("alpha", 0.5) != 0.5:
        parts.append(f"alpha {row['alpha']:g}")
    if row.get("temperature", 4.0) != 4.0:
        parts.append(f"T {row['temperature']:g}")
    if row.get("batch_size", 64) != 64:
        parts.append(f"batch {row['batch_size']}")
    return ", ".join(parts)


def summarize(paths: list[Path]) -> str:
    """Markdown tables (accuracy rows, then INT8 rows) of every row in the result files."""
    lines = ["| model | criterion | k | setting | RPR | MACs | top-1 orig | pruned | after KD | drop (pt) "
             "| KD budget | KD wall s | score s |", "|" + "---|" * 13]
    int8 = ["| model | fp32-pruned / int8 bytes | ratio | vs original file | top-1 fp32-pruned | top-1 int8 "
            "| b1 ms fp32 / int8 | b32 ms fp32 / int8 |", "|" + "---|" * 8]
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            for r in run["rows"]:
                setting = r["label"] or "-"
                lines.append(
                    f"| {r['model'].replace('_ts_opset13', '').removesuffix('.onnx')} | {r['criterion']} | {r['k']:g} | {setting} "
                    f"| {r['rpr']:.3f} | {r['macs_ratio']:.3f} | {100 * r['top1_original']:.2f} "
                    f"| {100 * r['top1_pruned']:.2f} | {100 * r['top1_kd']:.2f} | {r['drop_kd']:.2f} "
                    f"| {r['epochs']} ep x {r['train_images']:,} ({r['train_order']}, {budget_options(r)}) "
                    f"| {r['kd_s']:.0f} | {r['score_s']:.0f} |")
                q = r.get("int8")
                if q:
                    lat = {x["batch"]: x for x in q["latency_fp32_vs_int8"]}
                    original = (DATA / "models" / r["model"]).stat().st_size
                    int8.append(
                        f"| {r['model'].replace('_ts_opset13', '').removesuffix('.onnx')} | {q['fp32_bytes']:,} / {q['int8_bytes']:,} "
                        f"| {q['size_ratio']:.3f} | {q['int8_bytes'] / original:.3f} "
                        f"| {100 * r['top1_kd']:.2f} | {100 * q['top1_int8']:.2f} "
                        f"| {lat[1]['before_ms']:.2f} / {lat[1]['after_ms']:.2f} "
                        f"| {lat[32]['before_ms']:.1f} / {lat[32]['after_ms']:.1f} |")
    return "\n".join(lines + [""] + int8)


if __name__ == "__main__":
    main()
