"""report.json and the printed table (SPEC section 9): strict JSON with its context, and the
held-out story of a run stage by stage."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder

from onnx_ocnna.cli import main
from onnx_ocnna.demo import digits_model_and_data
from onnx_ocnna.model_io import ort_session, save_model


def _strict(text: str):
    """json.loads that rejects the NaN / Infinity / -Infinity tokens Python writes by default."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_strict_json_writes_non_finite_numbers_as_null():
    from onnx_ocnna.jsonio import dumps

    value = {"a": [1.0, float("inf"), {"b": np.float32("nan")}], "c": np.array([[np.inf, 2.0]]),
             "d": (np.float64(-np.inf), np.int64(3), np.bool_(True)), 4: Path("x/y")}
    data = _strict(dumps(value))
    assert data == {"a": [1.0, None, {"b": None}], "c": [[None, 2.0]], "d": [None, 3, True], "4": "x/y"}


@pytest.fixture
def tiny(tmp_path) -> dict[str, Path]:
    """A small CNN and two identical calibration images: every OCNNA score is 0/0 spread, +inf."""
    from PIL import Image

    g = GraphBuilder(seed=0)
    a = g.relu(g.conv("x", 3, 8, name="conv_a"))
    b = g.relu(g.conv(a, 8, 6, name="conv_b"))
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [b])[0]])[0], 6, 4, name="fc")
    model = tmp_path / "in.onnx"
    save_model(g.model(["N", 3, 8, 8], out), model)
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for name in ("a.png", "b.png"):
        Image.fromarray(pixels).save(images / name)
    return {"model": model, "images": images}


def test_report_json_is_strict_and_records_its_context(tiny, tmp_path, capsys):
    out, report, plan = tmp_path / "out.onnx", tmp_path / "report.json", tmp_path / "plan.json"
    with pytest.warns(UserWarning, match="noisy"):
        code = main([str(tiny["model"]), str(out), "--calib", str(tiny["images"]), "--mean", "0.5", "--std", "0.25",
                     "--percentile", "40", "--no-reconstruct", "--quiet", "--report", str(report),
                     "--save-plan", str(plan)])
    assert code == 0, capsys.readouterr().err
    data = _strict(report.read_text())
    assert data["schema_version"] == 1
    assert data["command"][:3] == ["onnx-ocnna", str(tiny["model"]), str(out)]  # this run's, not pytest's argv
    assert data["command"][-2:] == ["--save-plan", str(plan)]
    assert data["input"] == {"path": str(tiny["model"]), "bytes": tiny["model"].stat().st_size,
                             "sha256": _sha(tiny["model"])}
    assert data["output"] == {"path": str(out), "bytes": out.stat().st_size, "sha256": _sha(out)}
    assert {"onnx_ocnna", "onnx", "onnxruntime", "numpy", "torch", "python"} <= set(data["versions"])
    assert data["versions"]["onnx"] == onnx.__version__
    calibration = data["calibration"]
    assert calibration["source"] == str(tiny["images"]) and calibration["kind"] == "image folder"
    assert calibration["samples"] == calibration["scored_samples"] == 2
    assert calibration["preprocessing"]["preset"] is None  # --mean/--std given, no preset
    assert calibration["preprocessing"]["mean"] == [0.5] and calibration["preprocessing"]["std"] == [0.25]
    assert calibration["preprocessing"]["size"] == [8, 8]
    assert {"score_s", "rewrite_s", "write_s", "total_s"} <= set(data["timings"])
    # The steady filters' +inf scores are null, in the report's plan and in the plan file alike.
    for scores in ([s for g in data["extra"]["plan"]["groups"] for s in g.get("scores", [])],
                   [s for g in _strict(plan.read_text())["groups"] for s in g.get("scores", [])]):
        assert scores and None in scores and not any(isinstance(s, str) for s in scores)


def test_quantized_run_records_both_written_files(tiny, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main([str(tiny["model"]), str(out), "--calib", str(tiny["images"]), "--criterion", "l1", "--preprocess", "raw",
                 "--quantize", "int8", "--quiet", "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    data = _strict(report.read_text())
    fp32 = tmp_path / "out.fp32.onnx"
    assert data["output"]["sha256"] == _sha(out) and data["output"]["format"] == "int8"
    assert data["output"]["float"] == {"path": str(fp32), "bytes": fp32.stat().st_size, "sha256": _sha(fp32)}
    assert data["timings"]["quantize_s"] > 0


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    model, data = digits_model_and_data()
    onnx.save(model, root / "digits.onnx")
    for name in ("calibration", "train", "test"):
        np.savez(root / f"{name}.npz", input=data[name]["input"], labels=data[name]["labels"])
    np.save(root / "test.npy", data["test"]["input"])
    return root


def _stage(stdout: str, label: str) -> re.Match:
    match = re.search(rf"^  {label} +([0-9.]+) %(?: +(drop|gain) ([0-9.]+) pt)? +([0-9.]+) %$", stdout, re.M)
    assert match, (label, stdout)
    return match


def test_table_shows_top1_after_every_stage_and_their_times(digits_files, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main([str(digits_files / "digits.onnx"), str(out), "--calib", str(digits_files / "calibration.npz"),
                 "--percentile", "50", "--distill", "--train", str(digits_files / "train.npz"),
                 "--train-samples", "300", "--epochs", "1", "--no-flip", "--eval", str(digits_files / "test.npz"),
                 "--threads", "1", "--quiet", "--report", str(report)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    stdout = captured.out
    assert "held-out top-1, 450 labelled samples" in stdout
    original = float(_stage(stdout, "original").group(1))
    rows = {label: _stage(stdout, label) for label in ("after pruning", "after reconstruction", "after distillation")}
    for match in rows.values():  # the change is spelled out, in points, against the original
        points = float(match.group(3))
        assert points == pytest.approx(abs(original - float(match.group(1))), abs=0.011)
        assert match.group(2) == ("drop" if float(match.group(1)) <= original else "gain")
    assert float(rows["after reconstruction"].group(1)) > float(rows["after pruning"].group(1))
    assert re.search(r"^time: .*scoring [0-9.]+ s, .*reconstruction [0-9.]+ s,", stdout, re.M)
    assert re.search(r"distillation [0-9.]+ s, .*evaluation [0-9.]+ s", stdout.replace("\n     ", ""))
    assert re.search(r"total [0-9.]+ s$", stdout, re.M)
    data = _strict(report.read_text())
    stages = data["accuracy"]["stages"]
    assert [s["stage"] for s in stages] == ["original", "pruned", "reconstructed", "distilled"]
    # The last stage is the written model, measured on the same held-out data.
    x, y = np.load(digits_files / "test.npz")["input"], np.load(digits_files / "test.npz")["labels"]
    top1 = float((ort_session(out).run(None, {"input": x})[0].argmax(1) == y).mean())
    assert stages[-1]["top1"] == pytest.approx(top1) == pytest.approx(data["accuracy"]["top1_after"])
    assert data["timings"]["distill_s"] >= data["extra"]["distillation"]["seconds"] > 0
    settings = data["extra"]["distillation"]["settings"]
    assert (settings["threads"], settings["threads_from"]) == (1, "given")  # --threads reached the distiller


def test_table_without_labels_shows_agreement_per_stage(digits_files, tmp_path, capsys):
    code = main([str(digits_files / "digits.onnx"), str(tmp_path / "out.onnx"),
                 "--calib", str(digits_files / "calibration.npz"), "--percentile", "50",
                 "--eval", str(digits_files / "test.npy"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "held-out, 450 samples without labels" in captured.out and "top-1 agreement with original" in captured.out
    pruned = re.search(r"^  after pruning +([0-9.]+) %$", captured.out, re.M)
    refitted = re.search(r"^  after reconstruction +([0-9.]+) %$", captured.out, re.M)
    assert pruned and refitted and float(refitted.group(1)) > float(pruned.group(1))
    assert " pt" not in captured.out  # no drop without labels to drop from


def test_table_says_when_other_load_disturbed_the_latency_medians():
    from onnx_ocnna.metrics import ModelStats
    from onnx_ocnna.report import Report

    stats = ModelStats(parameters=100, macs=1000, nodes=5, file_bytes=4000)
    quiet = {"batch": 1, "threads": 1, "before_ms": 2.0, "after_ms": 1.35, "speedup": 1.48, "runs": 30,
             "before_min_ms": 1.8, "after_min_ms": 1.23, "speedup_fastest": 1.46}
    loaded = {**quiet, "batch": 32, "before_ms": 6.2, "after_ms": 1.52, "speedup": 4.09}
    by_cpu = {**loaded, "speedup_fastest": 3.9, "before_cpu_ms": 1.9, "after_cpu_ms": 1.3, "speedup_cpu": 1.46}
    table = Report(before=stats, after=stats, latency=[quiet, loaded, by_cpu]).table()
    b1, b32, cpu = (line for line in table.splitlines() if line.startswith("latency"))
    assert b1.endswith("1.48x speed-up")
    assert "4.09x speed-up (disturbed by other load; fastest runs 1.46x)" in b32
    assert "4.09x speed-up (disturbed by other load; CPU time 1.46x)" in cpu


def test_a_damage_rounding_made_negative_prints_as_zero():
    """A KL is never negative; float rounding of two equal distributions gave '-0.0000'."""
    from onnx_ocnna.metrics import ModelStats
    from onnx_ocnna.report import Report

    stats = ModelStats(parameters=100, macs=1000, nodes=5, file_bytes=4000)
    allocation = {"objective": "macs", "groups": [
        {"members": ["conv_a"], "kept": 8, "channels": 16, "damage": -3e-9, "saved_params": 0, "saved_macs": 500}]}
    table = Report(before=stats, after=stats, extra={"allocation": allocation}).table()
    assert "conv_a: 8/16, damage 0.0000, 500 MACs" in table and "-0.0000" not in table
