"""The embedded demo and the --distill / distill command paths on the shipped digits CNN."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_ocnna.cli import main
from onnx_ocnna.demo import digits_model_and_data
from onnx_ocnna.model_io import load_model, ort_session


def test_demo_compresses_and_recovers_accuracy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quiet"]) == 0
    out = capsys.readouterr().out
    written = tmp_path / "digits_cnn.ocnna.onnx"  # the demo hands over its model, and says where
    assert f"wrote the compressed model to {written}" in out
    demo_model = load_model(written)
    assert sum(np.prod(i.dims) for i in demo_model.graph.initializer) < 0.45 * 56_874
    speedups = [float(s) for s in re.findall(r"ms \(speed-up ([0-9.]+)x\)", out)]
    assert len(speedups) == 2  # batch 1 and 32, measured in ONNX Runtime
    rpr = float(re.search(r"RPR = ([0-9.]+)", out).group(1))
    before = float(re.search(r"after reconstruction +([0-9.]+) %", out).group(1))
    after = float(re.search(r"after distillation +([0-9.]+) %", out).group(1))
    original = float(re.search(r"original +([0-9.]+) %", out).group(1))
    assert rpr < 0.45
    assert original - before < 5.0  # the default reconstruction alone keeps most of the accuracy
    assert after >= before - 0.5  # distillation does not undo it
    assert original - after < 3.0
    # The same accuracy from the written file as printed.
    model, data = digits_model_and_data()
    x, y = data["test"]["input"], data["test"]["labels"]
    assert abs(100 * float((ort_session(demo_model).run(None, {"input": x})[0].argmax(1) == y).mean()) - after) < 0.01
    # Never overwritten without being asked: refused at once, file untouched.
    stamp = written.stat().st_mtime_ns
    assert main(["demo", "--quiet"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and written.stat().st_mtime_ns == stamp


def test_main_command_with_distill_and_distill_subcommand(tmp_path, capsys):
    model, data = digits_model_and_data()
    onnx.save(model, tmp_path / "digits.onnx")
    for name in ("calibration", "train", "test"):
        np.savez(tmp_path / f"{name}.npz", input=data[name]["input"], labels=data[name]["labels"])
    pruned = tmp_path / "pruned.onnx"
    code = main([str(tmp_path / "digits.onnx"), str(pruned), "--calib", str(tmp_path / "calibration.npz"),
                 "--percentile", "50", "--no-reconstruct", "--quiet", "--report", str(tmp_path / "r.json")])
    assert code == 0
    distilled = tmp_path / "distilled.onnx"
    command = ["distill", str(pruned), str(distilled), "--teacher", str(tmp_path / "digits.onnx"),
               "--train", str(tmp_path / "train.npz"), "--epochs", "2", "--no-flip", "--quiet",
               "--eval", str(tmp_path / "test.npz"), "--threads", "1"]
    report = tmp_path / "distill.json"
    assert main([*command, "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "epoch 2" in out
    # The report names the files by hash and keeps the history the console printed.
    record = json.loads(report.read_text())
    assert record["kind"] == "distill" and record["command"][:2] == ["onnx-ocnna", "distill"]
    assert record["output"]["sha256"] == hashlib.sha256(distilled.read_bytes()).hexdigest()
    assert record["input"]["path"] == str(pruned) and record["teacher"]["path"] == str(tmp_path / "digits.onnx")
    epochs = record["distillation"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert f"held-out top-1 {100 * epochs[-1]['eval_accuracy']:.2f} %" in out
    assert record["distillation"]["settings"]["threads"] == 1 and record["total_s"] > 0
    # An existing report is kept unless --overwrite, and nothing is trained or written before that is known.
    fresh = tmp_path / "fresh.onnx"
    assert main([*command[:2], str(fresh), *command[3:], "--report", str(report)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and not fresh.exists()
    # A fixed thread count repeats the run bit for bit.
    again = tmp_path / "again.onnx"
    assert main([*command[:2], str(again), *command[3:]]) == 0
    assert all(np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y)) for x, y in
               zip(load_model(distilled).graph.initializer, load_model(again).graph.initializer, strict=True))
    # Same graph, new weights, runs in ONNX Runtime and beats the undistilled pruned model.
    a, b = load_model(pruned), load_model(distilled)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert [tuple(i.dims) for i in a.graph.initializer] == [tuple(i.dims) for i in b.graph.initializer]
    x, y = data["test"]["input"], data["test"]["labels"]
    acc = {name: float((ort_session(m).run(None, {"input": x})[0].argmax(1) == y).mean()) for name, m in
           (("pruned", a), ("distilled", b))}
    assert acc["distilled"] > acc["pruned"]


def test_sweep_command_writes_plot_and_csv(tmp_path, capsys):
    model, data = digits_model_and_data()
    onnx.save(model, tmp_path / "digits.onnx")
    for name in ("calibration", "test"):
        np.savez(tmp_path / f"{name}.npz", input=data[name]["input"], labels=data[name]["labels"])
    out = tmp_path / "sweep.png"
    code = main(["sweep", str(tmp_path / "digits.onnx"), "--calib", str(tmp_path / "calibration.npz"),
                 "--eval", str(tmp_path / "test.npz"), "--percentiles", "0,30,60", "-o", str(out), "--quiet"])
    assert code == 0
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("percentile")
    printed = capsys.readouterr().out
    rprs = [float(line.split()[1]) for line in printed.splitlines()[1:4]]
    assert rprs[0] == 1.0 and rprs[0] > rprs[1] > rprs[2]
    # The main command's recovery and budget options: a sweep along --target-macs, reconstructed.
    out = tmp_path / "budgets.png"
    code = main(["sweep", str(tmp_path / "digits.onnx"), "--calib", str(tmp_path / "calibration.npz"),
                 "--eval", str(tmp_path / "test.npz"), "--target-macs", "0.8,0.5", "--reconstruct-samples", "128",
                 "--round-to", "8", "-o", str(out), "--quiet"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["macs", "target"]
    macs = [float(line.split()[2]) for line in lines[1:3]]
    assert macs[0] <= 0.8 and macs[1] <= 0.5
    code = main(["sweep", str(tmp_path / "digits.onnx"), "--calib", str(tmp_path / "calibration.npz"),
                 "--eval", str(tmp_path / "test.npz"), "--target-macs", "0.5", "--percentiles", "10",
                 "-o", str(out), "--quiet", "--overwrite"])
    assert code == 2 and "one axis" in capsys.readouterr().err
