"""One function per compressor: prune one ONNX model to several remaining-parameter targets.

Each runs inside a worker process (worker.py) so its wall time and peak memory are its own.
Every function takes a job dict and returns {"targets": {str(R): result}, ...} where a result is
{"path", "rpr", "setting", "tool_s", "search_s"} or {"error": text}. ``tool_s`` is the time of
the call that produced the model; ``search_s`` the extra time the harness spent finding a
setting that meets the target, for tools that cannot aim at a parameter ratio themselves.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from bench.common import count_parameters, current_rss_mib, error_text, load_arrays


def _bisect(attempt: Callable[[float], float], target: float, lo: float, hi: float, tol: float) -> tuple[float, float]:
    """Smallest setting in [lo, hi] (to ``tol``) whose remaining ratio is <= target, assuming the
    ratio falls as the setting grows. Returns (setting, ratio); raises if ``hi`` misses."""
    ratio = attempt(hi)
    if ratio > target:
        raise RuntimeError(f"cannot reach RPR <= {target:g}: the largest setting {hi:g} leaves RPR {ratio:.3f}")
    best = (hi, ratio)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        ratio = attempt(mid)
        if ratio <= target:
            hi, best = mid, (mid, ratio)
        else:
            lo = mid
    return best


def _bisected_targets(job: dict, remaining: Callable[[float], float], build: Callable[[float], onnx.ModelProto],
                      hi: float, setting: str, base_parameters: int) -> dict:
    """For every target R: bisect the peer's setting in [0, hi] on ``remaining`` (its own
    parameter ratio), then time one ``build`` at the setting found and save the model.
    A failing target gets its error instead (it goes into the table cell)."""
    out: dict = {"ready_rss_mib": current_rss_mib(), "targets": {}}
    for target in job["targets"]:
        try:
            start = time.perf_counter()
            value, _ = _bisect(remaining, target, 0.0, hi, 0.002)
            search_s = time.perf_counter() - start
            start = time.perf_counter()
            pruned = build(value)
            seconds = time.perf_counter() - start
            out["targets"][str(target)] = {
                "path": _save(pruned, Path(job["out_dir"]), f"{job['name']}_{target}"),
                "rpr": count_parameters(pruned) / base_parameters, "setting": f"{setting}={value:.3f}",
                "tool_s": seconds, "search_s": search_s}
        except Exception as exc:  # noqa: BLE001 - the error goes into the table cell
            out["targets"][str(target)] = {"error": error_text(exc)}
    return out


def _save(model: onnx.ModelProto, out_dir: Path, name: str) -> str:
    path = out_dir / f"{name}.onnx"
    onnx.save(model, path)
    return str(path)


# --------------------------------------------------------------------------- onnx-ocnna


def run_ocnna(job: dict) -> dict:
    """Score once with the job's criterion, then compress(target_params=R) for every target.
    A ``default`` job runs compress as shipped (measured allocation, reconstruction); its
    damage measurements are kept on the scores, so only the first target pays for them."""
    from onnx_ocnna import api

    model = onnx.load(job["model"])
    calib = load_arrays(Path(job["calib"]))
    options = job.get("criterion_options") or {}
    ready_rss = current_rss_mib()  # after imports and data: the tool's own memory comes on top
    ready = time.perf_counter()
    scores = api.score(model, calib, criterion=job["criterion"], criterion_options=options,
                       calibration_options={"batch_size": 64}, progress=False)
    score_s = time.perf_counter() - ready
    out: dict = {"score_s": score_s, "samples": scores.samples, "ready_rss_mib": ready_rss, "targets": {}}
    for target in job["targets"]:
        try:
            start = time.perf_counter()
            if job.get("default"):
                pruned, report = api.compress(model, calib, scores=scores, target_params=target,
                                              criterion=job["criterion"], progress=False,
                                              calibration_options={"batch_size": 64})
                check = report.extra["allocation"].get("final_check", {})
                out["targets"][str(target)] = {
                    "path": _save(pruned, Path(job["out_dir"]), f"{job['name']}_{target}"), "rpr": report.rpr,
                    "setting": f"allocation ({check.get('chosen', 'measured')})",
                    "tool_s": score_s + time.perf_counter() - start, "search_s": 0.0,
                    "timings": report.timings}
                continue
            # The uniform percentile (the paper's setting): with calibration data a budget is
            # otherwise allocated, which is the "default" job.
            pruned, report = api.compress(model, calib if job.get("reconstruct") else None, scores=scores,
                                          target_params=target, criterion=job["criterion"],
                                          criterion_options=options, exclude=job.get("exclude"), progress=False,
                                          reconstruct=bool(job.get("reconstruct")), allocation="uniform",
                                          calibration_options={"batch_size": 64})
            seconds = time.perf_counter() - start
            out["targets"][str(target)] = {
                "path": _save(pruned, Path(job["out_dir"]), f"{job['name']}_{target}"),
                "rpr": report.rpr, "setting": f"k={report.settings['percentile']:.2f}",
                "tool_s": score_s + seconds, "search_s": 0.0}
        except Exception as exc:  # noqa: BLE001 - the error goes into the table cell
            out["targets"][str(target)] = {"error": error_text(exc)}
    return out


# --------------------------------------------------------------------------- onnxsim


def run_onnxsim(job: dict) -> dict:
    """onnxsim.pruning.apply_structured_pruning / apply_structured_wanda_pruning; the harness
    bisects ``sparsity`` (the fraction of each matched chain's channels removed)."""
    import onnxsim.pruning as osp

    fn = getattr(osp, job["function"])
    model = onnx.load(job["model"])
    base = count_parameters(model)
    kwargs: dict = {}
    if job["function"] == "apply_structured_wanda_pruning":
        x = load_arrays(Path(job["calib"]))["input"]
        kwargs["calibration_data"] = [{"input": x[i:i + 64]} for i in range(0, len(x), 64)]

    def call(sparsity: float) -> onnx.ModelProto:
        # The functions resize tensors in place: give each call its own copy.
        return fn(copy.deepcopy(model), sparsity=sparsity, **kwargs)

    return _bisected_targets(job, lambda s: count_parameters(call(s)) / base, call, 0.99, "sparsity", base)


# --------------------------------------------------------------------------- Torch-Pruning


def run_torch_pruning(job: dict) -> dict:
    """Torch-Pruning's MetaPruner with GroupMagnitudeImportance (L2, group mean) on the network
    rebuilt in PyTorch, exported back to ONNX (TorchScript exporter, opset 13). The harness
    bisects ``pruning_ratio``. Scope "all" lets Torch-Pruning find every coupled group itself;
    "block-internal" ignores the layers whose outputs meet at residual Adds."""
    import torch
    import torch_pruning as tp

    from bench.cifar_resnet import from_onnx, parameter_count

    model = onnx.load(job["model"])
    bn_kept = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    example = torch.randn(1, 3, 32, 32)

    def prune(ratio: float):
        net = from_onnx(model)
        ignored = net.block_internal_only() if job["scope"] == "block-internal" else [net.linear]
        pruner = tp.pruner.MetaPruner(net, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=ignored)
        pruner.step()
        return net

    def build(ratio: float) -> onnx.ModelProto:
        net = prune(ratio)
        pruned = _export(net, bn_kept)
        _check_export(net, pruned)
        return pruned

    base = parameter_count(from_onnx(model))
    return _bisected_targets(job, lambda r: parameter_count(prune(r)) / base, build, 0.95, "pruning_ratio",
                             count_parameters(model))


def _export(net, bn_kept: bool) -> onnx.ModelProto:
    import io

    import torch

    buffer = io.BytesIO()
    # PRESERVE keeps BatchNormalization nodes like the BN-kept originals; EVAL folds them.
    mode = torch.onnx.TrainingMode.PRESERVE if bn_kept else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), torch.randn(1, 3, 32, 32), buffer, dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["logits"], training=mode,
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue())


def _check_export(net, model: onnx.ModelProto) -> None:
    """The exported graph must compute what the pruned PyTorch network computes."""
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    if not np.allclose(got, want, atol=1e-3, rtol=1e-3):
        raise RuntimeError(f"the ONNX export differs from the pruned network by {np.abs(got - want).max():.2e}")


# --------------------------------------------------------------------------- reference


def run_ort_pass(job: dict) -> dict:
    """One plain ONNX Runtime pass over the calibration set: the yardstick of SPEC section 9."""
    import onnxruntime as ort

    model = onnx.load(job["model"])
    x = load_arrays(Path(job["calib"]))["input"]
    ready_rss = current_rss_mib()
    start = time.perf_counter()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for i in range(0, len(x), 64):
        session.run(None, {"input": x[i:i + 64]})
    return {"pass_s": time.perf_counter() - start, "ready_rss_mib": ready_rss, "targets": {}}


RUNNERS = {"onnx-ocnna": run_ocnna, "onnxsim": run_onnxsim, "torch-pruning": run_torch_pruning,
           "ort-pass": run_ort_pass}
