"""The percentile sweep (onnx_ocnna.sweep) on the shipped digits CNN."""

from __future__ import annotations

import csv

import pytest

from onnx_ocnna import api
from onnx_ocnna.demo import digits_model_and_data
from onnx_ocnna.errors import InputError
from onnx_ocnna.evaluate import predictions
from onnx_ocnna.sweep import CSV_FIELDS, run_sweep


@pytest.fixture(scope="module")
def digits():
    return digits_model_and_data()


def test_sweep_scores_once_and_measures_every_k(digits, tmp_path, monkeypatch):
    model, data = digits
    calls = []
    real_score = api.score
    monkeypatch.setattr(api, "score", lambda *a, **k: calls.append(1) or real_score(*a, **k))
    png, table = tmp_path / "sweep.png", tmp_path / "sweep.csv"
    ks = [0, 20, 40, 60]
    rows = run_sweep(model, data["calibration"], data["test"], ks, out_png=png, out_csv=table,
                     calibration_options={"batch_size": 128})
    assert len(calls) == 1  # one scoring pass serves every percentile
    assert [r["percentile"] for r in rows] == ks
    base_pred, labels = predictions(model, api.as_source(data["test"], model, batch_size=256).batches())
    base_top1 = float((base_pred == labels).mean())
    assert rows[0]["rpr"] == 1.0 and rows[0]["top1_after"] == pytest.approx(base_top1) and rows[0]["agreement"] == 1.0
    assert all(r["top1_before"] == pytest.approx(base_top1) for r in rows)
    rprs = [r["rpr"] for r in rows]
    assert all(a > b for a, b in zip(rprs, rprs[1:]))  # more pruning, fewer parameters
    assert rows[-1]["rpr"] < 0.3 and rows[-1]["macs_ratio"] < 0.3
    # The k = 40 point is the model compress() gives at k = 40 with the same scores.
    _, report = api.compress(model, data["calibration"], percentile=40, progress=False,
                             calibration_options={"batch_size": 128})
    assert rows[2]["parameters"] == report.after.parameters
    with open(table) as handle:
        lines = list(csv.DictReader(handle))
    assert list(lines[0]) == list(CSV_FIELDS) and len(lines) == len(ks)
    assert float(lines[2]["rpr"]) == pytest.approx(rows[2]["rpr"])
    assert lines[1]["top1_distilled"] == ""  # not distilled
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_with_distillation_recovers_accuracy(digits):
    model, data = digits
    rows = run_sweep(model, data["calibration"], data["test"], [0, 40], distill_epochs=3, train_data=data["train"],
                     distill_options={"hflip": False}, compress_options={"reconstruct": False})
    assert rows[0]["distill_seconds"] == 0.0 and rows[0]["top1_distilled"] == rows[0]["top1_after"]
    assert rows[1]["top1_distilled"] > rows[1]["top1_after"] + 0.2


def test_sweep_without_labels_plots_agreement(digits, tmp_path):
    model, data = digits
    unlabelled = {"input": data["test"]["input"]}
    rows = run_sweep(model, None, unlabelled, [0, 50], criterion="l1", out_png=tmp_path / "s.png")
    assert "top1_after" not in rows[0] and rows[0]["agreement"] == 1.0 and rows[1]["agreement"] < 1.0
    assert (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.parametrize("ks", [[], [-5], [120]])
def test_sweep_rejects_bad_percentiles(digits, ks):
    model, data = digits
    with pytest.raises(InputError):
        run_sweep(model, data["calibration"], data["test"], ks)


def test_sweep_recovers_and_budgets_like_the_main_command(digits, tmp_path):
    model, data = digits
    plain = run_sweep(model, data["calibration"], data["test"], [60], compress_options={"reconstruct": False})
    default = run_sweep(model, data["calibration"], data["test"], [60])
    # Reconstruction is on by default, as in the main command (the old sweep plotted k = 60 unrefitted).
    _, report = api.compress(model, data["calibration"], percentile=60, progress=False)
    assert default[0]["parameters"] == report.after.parameters
    assert default[0]["top1_after"] > plain[0]["top1_after"] + 0.05
    rows = run_sweep(model, data["calibration"], data["test"], targets=("params", [0.7, 0.4]),
                     out_png=tmp_path / "t.png", out_csv=tmp_path / "t.csv")
    assert [r["objective"] for r in rows] == ["params", "params"] and [r["target"] for r in rows] == [0.7, 0.4]
    assert rows[0]["rpr"] <= 0.7 and rows[1]["rpr"] <= 0.4 and rows[0]["percentile"] is None
    _, budget = api.compress(model, data["calibration"], target_params=0.4, progress=False)
    assert rows[1]["parameters"] == budget.after.parameters  # the same model as the main command's
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="either percentiles or targets"):
        run_sweep(model, data["calibration"], data["test"], [10], targets=("params", [0.5]))
    with pytest.raises(InputError, match=r"ratios must lie in \(0, 1\]"):
        run_sweep(model, data["calibration"], data["test"], targets=("macs", [1.5]))
