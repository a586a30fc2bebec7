"""--max-drop: the most compressed model within an accepted drop, on the shipped digits CNN."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnx_ocnna import api
from onnx_ocnna.cli import main
from onnx_ocnna.demo import digits_model_and_data
from onnx_ocnna.errors import InputError
from onnx_ocnna.evaluate import HeldOut
from onnx_ocnna.model_io import ort_session
from onnx_ocnna.search import Candidate, _choose, most_compressed, same_data


@pytest.fixture(scope="module")
def digits():
    return digits_model_and_data()


def _top1(model, data) -> float:
    return 100 * float((ort_session(model).run(None, {"input": data["input"]})[0].argmax(1) == data["labels"]).mean())


def test_search_keeps_the_drop_and_takes_the_smallest(digits, tmp_path):
    model, data = digits
    held_out = HeldOut(model, api.as_source(data["test"], model, batch_size=256).batches)
    result = most_compressed(model, data["calibration"], held_out, 2.0, objective="params", progress=False,
                             work_dir=tmp_path, compress_options={"damage_samples": 64,
                                                                  "reconstruct_options": {"samples": 128}})
    chosen = result.chosen
    assert chosen.status == "chosen" and not chosen.int8 and chosen.drop <= 2.0
    # The drop is the one of the model handed back, measured on the held-out data.
    assert _top1(model, data["test"]) - _top1(chosen.model, data["test"]) == pytest.approx(chosen.drop, abs=1e-6)
    within = [c for c in result.candidates if c.drop <= 2.0]
    assert chosen.rpr == min(c.rpr for c in within)
    beyond = [c for c in result.candidates if c.drop > 2.0]
    assert beyond and all(c.status.startswith("drop ") for c in beyond)  # the search went past D, and says so
    assert chosen.rpr < 0.6  # the digits CNN loses under 2 points well below 60 % of its parameters


def test_choice_breaks_ties_by_file_size_and_never_takes_a_larger_drop():
    def cand(value, size, drop):
        return Candidate(0.5, False, 1.0, 1.0, size, 1.0, None, None, 1.0, drop, value)

    a, b, c = cand(0.5, 200, 0.5), cand(0.5, 100, 0.9), cand(0.3, 50, 1.5)
    assert _choose([a, b, c], 1.0) is b
    assert c.status == "drop 1.50 > 1" and a.status == "within the drop, larger by the objective"
    assert _choose([c], 1.0) is None


def test_same_data_means_the_same_files(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    assert same_data(tmp_path / "train", tmp_path / "train" / "cat")
    assert same_data(str(tmp_path / "train"), tmp_path / "train/../train")
    assert not same_data(tmp_path / "train", tmp_path / "test")


def test_command_line_writes_the_choice_and_its_study(digits, tmp_path, capsys):
    model, data = digits
    onnx.save(model, tmp_path / "digits.onnx")
    for name in ("calibration", "test"):
        np.savez(tmp_path / f"{name}.npz", input=data[name]["input"], labels=data[name]["labels"])
    base = [str(tmp_path / "digits.onnx"), str(tmp_path / "out.onnx"), "--calib", str(tmp_path / "calibration.npz")]
    # The accepted drop is measured on data the model was not calibrated on.
    assert main(base + ["--eval", str(tmp_path / "calibration.npz"), "--max-drop", "1"]) == 2
    assert "name the same files" in capsys.readouterr().err
    assert main(base + ["--quantize", "auto"]) == 2
    assert "give --max-drop" in capsys.readouterr().err
    assert main(base + ["--eval", str(tmp_path / "test.npz"), "--max-drop", "1", "--target-macs", "0.5"]) == 2
    assert "cannot be combined with --target-macs" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()
    code = main(base + ["--eval", str(tmp_path / "test.npz"), "--max-drop", "1", "--objective", "size",
                        "--quantize", "auto", "--quiet", "--report", str(tmp_path / "r.json"),
                        "--damage-samples", "64", "--reconstruct-samples", "128",
                        "--pareto", str(tmp_path / "pareto.png")])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    search = report["extra"]["search"]
    chosen = search["candidates"][search["chosen"]]
    # INT8 is chosen when it stays within the drop and is smaller; quantization alone was a candidate.
    assert chosen["status"] == "chosen" and chosen["drop"] <= 1.0 and chosen["int8"]
    assert chosen["size_bytes"] == min(c["size_bytes"] for c in search["candidates"] if c["drop"] <= 1.0)
    assert any(c["budget"] is None and c["int8"] for c in search["candidates"])
    assert chosen["size_ratio"] < 0.3  # pruning and INT8 together
    assert "chosen" in out and "max-drop search (size, at most 1 points)" in out
    assert "after reconstruction" in out and "after INT8 quantization" in out  # the written model's story
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in written.graph.node)  # OUT is the INT8 choice
    assert (tmp_path / "out.fp32.onnx").exists()  # and its float model beside it
    assert _top1(model, data["test"]) - _top1(written, data["test"]) == pytest.approx(chosen["drop"], abs=1e-6)
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_refuses_bad_arguments(digits):
    model, data = digits
    held_out = HeldOut(model, api.as_source(data["test"], model, batch_size=256).batches)
    with pytest.raises(InputError, match="--objective"):
        most_compressed(model, data["calibration"], held_out, 1.0, objective="speed")
    with pytest.raises(InputError, match="positive"):
        most_compressed(model, data["calibration"], held_out, 0.0)
