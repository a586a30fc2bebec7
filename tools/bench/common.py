"""Paths, the decoded CIFAR-10 subsets, JSON files and small measurements shared by the bench."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("OCNNA_SHARED_DATA", REPO.parent / "shared" / "data"))
MODELS = {
    "resnet20": "resnet20_ts_opset13.onnx",
    "resnet20-bn": "resnet20_ts_opset13_bn.onnx",
    "resnet56": "resnet56_ts_opset13.onnx",
    "resnet56-bn": "resnet56_ts_opset13_bn.onnx",
}


def commit_id() -> str:
    """The repository's short HEAD commit, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def model_path(key: str) -> Path:
    return SHARED / "models" / MODELS[key]


def error_text(exc: BaseException) -> str:
    """One line for a table cell: the exception type and the first line of its message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


def write_json(path: Path, data: Any) -> None:
    """Atomic write, so a crash mid-write never leaves a truncated results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM). Not ru_maxrss: Linux carries the parent's
    high-water mark across fork + exec into it, so a worker would report its parent's size."""
    return _status_mib("VmHWM:")


def current_rss_mib() -> float:
    return _status_mib("VmRSS:")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def count_parameters(model: onnx.ModelProto) -> int:
    """Float initializer elements the graph uses (the definition of onnx_ocnna.metrics, without
    importing onnx_ocnna, so a peer's worker process does not pay for it)."""
    used = {name for node in model.graph.node for name in node.input}
    return sum(math.prod(i.dims) for i in model.graph.initializer
               if i.name in used and onnx.helper.tensor_dtype_to_np_dtype(i.data_type).kind == "f")


# --------------------------------------------------------------------------- data


def cifar_subset(split: str, samples: int, seed: int, cache: Path, shuffle: bool = False) -> Path:
    """Decode a class-balanced subset of CIFAR-10 ``split`` once into ``cache``/<...>.npz.

    Returns the .npz path with ``input`` [N, 3, 32, 32] float32 (preset "imagenet-32") and ``labels`` [N].
    The subset is onnx_ocnna's seeded class-balanced choice; ``shuffle`` permutes it (seeded),
    because the subset comes out sorted by class and training on class-sorted batches fails.
    """
    path = cache / f"cifar10_{split}_{samples}_seed{seed}{'_shuffled' if shuffle else ''}.npz"
    if path.exists():
        return path
    from onnx_ocnna import api

    model = onnx.load(model_path("resnet20"), load_external_data=False)
    source = api.as_source(SHARED / "cifar10" / split, model, preprocess="imagenet-32", max_samples=samples,
                           batch_size=500, seed=seed)
    xs, ys = [], []
    for batch in source.batches():
        xs.append(batch.feeds["input"])
        ys.append(batch.labels)
    x, y = np.concatenate(xs), np.concatenate(ys)
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(y))
        x, y = x[order], y[order]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, input=x, labels=y)
    os.replace(tmp, path)
    return path


def calib_and_test(calib: int, test: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The no-training benchmarks' data (tools/bench_allocation.py, bench_synthesize.py):
    ``calib`` class-balanced, shuffled training images (seed 0) as {"input", "labels"} and
    ``test`` class-balanced test images (seed 1), decoded once into $OCNNA_BENCH_CACHE."""
    cache = Path(os.environ.get("OCNNA_BENCH_CACHE", "/tmp/ocnna_bench_cache"))
    real = load_arrays(cifar_subset("train", calib, 0, cache, shuffle=True))
    return {"input": real["input"], "labels": real["labels"]}, load_arrays(cifar_subset("test", test, 1, cache))


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# --------------------------------------------------------------------------- measurements


def top1(model: onnx.ModelProto, data: dict[str, np.ndarray], batch: int = 500) -> tuple[float, np.ndarray]:
    """Top-1 on labelled arrays and the predictions [N], in ONNX Runtime (all cores)."""
    from onnx_ocnna.model_io import ort_session

    session = ort_session(model)
    preds = [session.run(None, {"input": data["input"][i:i + batch]})[0].argmax(1)
             for i in range(0, len(data["labels"]), batch)]
    pred = np.concatenate(preds)
    return float(np.mean(pred == data["labels"])), pred


def top1_of_source(model: onnx.ModelProto, test, reference: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """{"top1"} (and, given the original's predictions [N], {"agreement"}) of ``model`` on a
    labelled calibration source, with its predictions [N]."""
    from onnx_ocnna import evaluate

    pred, labels = evaluate.predictions(model, test.batches())
    out = {"top1": float(np.mean(pred == labels))}
    if reference is not None:
        out["agreement"] = float(np.mean(pred == reference))
    return out, pred


def interleaved_latency(before: onnx.ModelProto, after: onnx.ModelProto, batch: int, threads: int,
                        runs: int = 20) -> dict:
    """The library's interleaved before/after latency, rows marked as measured without spinning."""
    from onnx_ocnna.evaluate import interleaved_latency as measure

    return {**measure(before, after, batch, threads, runs=runs), "spinning": False}
