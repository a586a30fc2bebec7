"""The command line: bad input gives one clear line and writes nothing; plans apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder

from onnx_ocnna.cli import main
from onnx_ocnna.model_io import load_model, ort_session, sample_feeds, save_model


def _small_model() -> onnx.ModelProto:
    g = GraphBuilder()
    a = g.relu(g.bn(g.conv("x", 3, 8, name="conv_a"), 8))
    b = g.relu(g.conv(a, 8, 6, name="conv_b"))
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [b])[0]])[0], 6, 4, name="fc")
    return g.model(["N", 3, 8, 8], out)


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "in.onnx"
    save_model(_small_model(), path)
    return path


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code, err):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("case", ["missing", "not_onnx", "truncated", "directory"])
def test_unreadable_inputs(case, tmp_path, capsys):
    path = tmp_path / "bad.onnx"
    if case == "not_onnx":
        path.write_text("this is not a model\n" * 10)
    elif case == "truncated":
        data = _small_model().SerializeToString()
        path.write_bytes(data[: len(data) // 2])
    elif case == "directory":
        path.mkdir()
    before = _snapshot(tmp_path)
    code, _, err = _run([path, tmp_path / "out.onnx", "--criterion", "l1"], capsys)
    line = _one_line_error(code, err)
    assert str(path) in line
    assert _snapshot(tmp_path) == before


def test_output_equal_to_input_is_refused(model_path, capsys):
    before = model_path.read_bytes()
    code, _, err = _run([model_path, model_path, "--criterion", "l1"], capsys)
    assert "is the input model" in _one_line_error(code, err)
    assert model_path.read_bytes() == before


def test_two_outputs_naming_one_file_are_refused(model_path, tmp_path, capsys):
    # Each output is written in turn, so --report out.onnx would replace the model with JSON.
    out = tmp_path / "out.onnx"
    code, _, err = _run([model_path, out, "--criterion", "l1", "--percentile", "50", "--report", out], capsys)
    assert "--report" in _one_line_error(code, err) and "same file as the output" in err
    code, _, err = _run([model_path, out, "--criterion", "l1", "--percentile", "50", "--report",
                         tmp_path / "r.json", "--save-plan", tmp_path / "." / "r.json"], capsys)
    assert "--save-plan" in _one_line_error(code, err) and "same file as --report" in err
    # Nor may an output replace a data file the run reads.
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.zeros((2, 3, 8, 8), np.float32))
    code, _, err = _run([model_path, out, "--calib", calib, "--report", calib], capsys)
    assert "is --calib, which this command reads" in _one_line_error(code, err)
    # The same with --overwrite: permission to replace an old file is not permission to write one twice.
    code, _, err = _run([model_path, out, "--criterion", "l1", "--percentile", "50", "--report", out,
                         "--overwrite"], capsys)
    assert "same file as the output" in _one_line_error(code, err)
    assert not out.exists()


def test_distill_refuses_to_write_over_its_teacher_or_twice_to_one_file(model_path, tmp_path, capsys):
    teacher = tmp_path / "teacher.onnx"
    teacher.write_bytes(model_path.read_bytes())
    before = _snapshot(tmp_path)
    common = ["--teacher", teacher, "--train", model_path, "--epochs", "1", "--quiet"]
    code, _, err = _run(["distill", model_path, teacher, *common, "--overwrite"], capsys)
    assert "is --teacher, which this command reads" in _one_line_error(code, err)
    code, _, err = _run(["distill", model_path, tmp_path / "s.onnx", *common, "--report", tmp_path / "s.onnx"],
                        capsys)
    assert "same file as the output" in _one_line_error(code, err)
    assert _snapshot(tmp_path) == before


def test_training_labels_that_are_not_the_models_classes_are_refused_before_pruning(model_path, tmp_path, capsys,
                                                                                      monkeypatch):
    """Distillation with a label term reads them only at its first batch, after the pruning and
    reconstruction (minutes on a large model); the run must stop before any of that."""
    from onnx_ocnna import api

    data = tmp_path / "train.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32), labels=np.arange(16) % 10)

    def no_pruning(*args, **kwargs):
        raise AssertionError("compress ran")

    monkeypatch.setattr(api, "compress", no_pruning)
    before = _snapshot(tmp_path)
    code, _, err = _run([model_path, tmp_path / "out.onnx", "--calib", data, "--target-params", "0.6", "--distill",
                         "--epochs", "1", "--quiet"], capsys)
    line = _one_line_error(code, err)
    assert "0..3 for a 4-class output, and the training data has label 9" in line and "--alpha 0" in line
    assert _snapshot(tmp_path) == before
    # Without the label term the labels are not read: the run goes on to the pruning.
    code, _, err = _run([model_path, tmp_path / "out.onnx", "--calib", data, "--target-params", "0.6", "--distill",
                         "--alpha", "0", "--epochs", "1", "--quiet"], capsys)
    assert "compress ran" in _one_line_error(code, err)


def test_sweep_refuses_a_plot_name_its_table_would_replace(model_path, tmp_path, capsys):
    code, _, err = _run(["sweep", model_path, "--calib", model_path, "--eval", model_path, "-o", tmp_path / "s.csv",
                         "--percentiles", "10"], capsys)
    assert "the table written beside the plot" in _one_line_error(code, err) and "same file as -o" in err


def test_a_speed_floor_without_a_macs_budget_is_refused(model_path, tmp_path, capsys):
    code, _, err = _run([model_path, tmp_path / "out.onnx", "--criterion", "l1", "--target-params", "0.5",
                         "--speed-floor", "0.9"], capsys)
    assert "--speed-floor applies to a MACs budget only" in _one_line_error(code, err)
    assert not (tmp_path / "out.onnx").exists()
    code, _, err = _run(["sweep", model_path, "--calib", model_path, "--eval", model_path, "-o", tmp_path / "s.png",
                         "--percentiles", "10", "--speed-floor", "0.9"], capsys)
    assert "--speed-floor applies to a MACs budget only" in _one_line_error(code, err)


def test_existing_output_needs_overwrite(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    code, _, err = _run([model_path, out, "--criterion", "l1"], capsys)
    assert "--overwrite" in _one_line_error(code, err)
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("argv", [["--criterion", "nonsense"], ["--scope", "everything"], ["--percentile", "abc"],
                                  ["--percentile", "150", "--criterion", "l1"], ["--percentile", "100"],
                                  ["--batch-size", "0"], ["--speed-floor", "-1"], ["--speed-floor", "fast"],
                                  ["--distill", "--threads", "0"]])
def test_bad_option_values(argv, model_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(model_path), str(tmp_path / "out.onnx"), *argv])
        raise SystemExit(0)
    err = capsys.readouterr().err
    if info.value.code == 0:
        pytest.fail("accepted a bad option value")
    _one_line_error(info.value.code, err)
    assert not (tmp_path / "out.onnx").exists()


def test_data_criterion_without_calibration(tmp_path, capsys):
    """Without --calib the data is synthesized from BatchNorm statistics (tests/test_synthesize.py);
    a model without any asks for calibration data in one line."""
    g = GraphBuilder()
    b = g.relu(g.conv(g.relu(g.conv("x", 3, 8, name="conv_a")), 8, 6, name="conv_b"))
    path = tmp_path / "folded.onnx"
    save_model(g.model(["N", 3, 8, 8], g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [b])[0]])[0], 6, 4)),
               path)
    code, _, err = _run([path, tmp_path / "out.onnx"], capsys)
    assert "calibration" in _one_line_error(code, err)


def _write_plan(tmp_path, groups, **extra) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": "onnx-ocnna-plan", "version": 1, "groups": groups, **extra}))
    return path


@pytest.mark.parametrize("groups,extra,message", [
    ([{"members": ["no_such_conv"], "remove": [0]}], {}, "not a Conv, Gemm or MatMul"),
    ([{"members": ["conv_a"], "remove": [8]}], {}, "has 8 channels"),
    ([{"members": ["conv_a"], "remove": list(range(8))}], {}, "every channel"),
    ([{"members": ["conv_a"], "remove": [0]}], {"model_sha256": "0" * 64}, "another model"),
    ([{"members": ["conv_a"], "remove": ["x"]}], {}, "list of channel indices"),
])
def test_bad_plans(groups, extra, message, model_path, tmp_path, capsys):
    plan = _write_plan(tmp_path, groups, **extra)
    out = tmp_path / "out.onnx"
    code, _, err = _run([model_path, out, "--plan", plan], capsys)
    assert message in _one_line_error(code, err)
    assert not out.exists()


def test_hand_written_plan_removes_channels(model_path, tmp_path, capsys):
    plan = _write_plan(tmp_path, [{"members": ["conv_a"], "remove": [1, 5]}])
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    code, stdout, err = _run([model_path, out, "--plan", plan, "--report", report], capsys)
    assert code == 0, err
    assert "parameters" in stdout
    pruned = load_model(out)
    shapes = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    assert shapes["conv_a.w"][0] == 6 and shapes["conv_b.w"][1] == 6
    data = json.loads(report.read_text())
    assert data["rpr"] < 1 and data["after"]["parameters"] < data["before"]["parameters"]
    onnx.checker.check_model(pruned, full_check=True)


def test_l1_compress_and_score_plan_round_trip(model_path, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    code, stdout, err = _run(["score", model_path, "--criterion", "l1", "-o", plan_path, "--percentile", "50"], capsys)
    assert code == 0, err
    plan = json.loads(plan_path.read_text())
    assert plan["format"] == "onnx-ocnna-plan" and plan["model_sha256"]
    by_member = {g["members"][0]: g for g in plan["groups"]}
    assert len(by_member["conv_a"]["remove"]) == 4 and len(by_member["conv_a"]["scores"]) == 8
    # The removed channels are those with the lowest L1 norm.
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in load_model(model_path).graph.initializer}
    l1 = np.abs(weights["conv_a.w"]).reshape(8, -1).sum(axis=1)
    assert sorted(by_member["conv_a"]["remove"]) == sorted(np.argsort(l1)[:4].tolist())
    out_plan, out_direct = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert _run([model_path, out_plan, "--plan", plan_path], capsys)[0] == 0
    assert _run([model_path, out_direct, "--criterion", "l1", "--percentile", "50"], capsys)[0] == 0
    feeds = sample_feeds(load_model(model_path))
    a = ort_session(load_model(out_plan)).run(None, feeds)[0]
    b = ort_session(load_model(out_direct)).run(None, feeds)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_inspect_lists_groups_and_reasons(tmp_path, capsys):
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 6, name="a"))
    odd = g.node("LpNormalization", [a], axis=1)[0]
    out = g.node("Flatten", [g.node("GlobalAveragePool", [g.conv(odd, 6, 4, name="b")])[0]])[0]
    path = tmp_path / "m.onnx"
    save_model(g.model([1, 3, 6, 6], out), path)
    code, stdout, _ = _run(["inspect", path], capsys)
    assert code == 0
    assert "frozen" in stdout and "LpNormalization" in stdout and "not supported" in stdout
    code, stdout, _ = _run(["inspect", path, "--json"], capsys)
    info = json.loads(stdout)
    assert info["groups"][0]["members"] == ["a"] and not info["groups"][0]["prunable"]


def test_nothing_prunable_is_written_unchanged(tmp_path, capsys):
    g = GraphBuilder()
    a = g.conv("x", 3, 6, name="only")
    model = g.model([1, 3, 6, 6], a)
    path = tmp_path / "m.onnx"
    save_model(model, path)
    out = tmp_path / "out.onnx"
    code, stdout, err = _run([path, out, "--criterion", "l1", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert "nothing prunable" in stdout
    assert load_model(out).graph == load_model(path).graph
    assert "nothing prunable" in json.loads((tmp_path / "r.json").read_text())["notes"][0]


def test_console_script_exit_code(model_path, tmp_path):
    result = subprocess.run([sys.executable, "-m", "onnx_ocnna.cli", str(tmp_path / "missing.onnx"),
                             str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such file" in result.stderr


def test_external_data_model_round_trip(tmp_path, capsys):
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 32, name="conv_a"))
    b = g.relu(g.conv(a, 32, 32, name="conv_b"))  # 36 KiB of weights: stored externally
    model = g.model(["N", 3, 8, 8], g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [b])[0]])[0], 32, 4))
    path = tmp_path / "ext.onnx"
    save_model(model, path, external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    out = tmp_path / "out.onnx"
    code, _, err = _run([path, out, "--criterion", "l1"], capsys)
    assert code == 0, err
    feeds = sample_feeds(model)
    assert ort_session(out).run(None, feeds)[0].shape == ort_session(model).run(None, feeds)[0].shape
    assert (tmp_path / "out.onnx.data").exists()  # external data in, external data out
    onnx.checker.check_model(str(out), full_check=True)  # and loadable from its path
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".ocnna-")]
    assert not leftovers


def test_bench_and_round_to_auto_reach_the_report(model_path, tmp_path, capsys):
    from onnx_ocnna.select import ort_block_size

    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, stdout, err = _run([model_path, out, "--criterion", "l1", "--percentile", "50", "--round-to", "auto",
                              "--bench", "--report", report], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["settings"]["round_to"] == ort_block_size()
    rows = data["latency"]
    assert {(r["batch"], r["threads"]) for r in rows} == {(1, 1), (32, 1)}
    for row in rows:
        assert row["before_ms"] > 0 and row["after_ms"] > 0
        assert row["speedup"] == pytest.approx(row["before_ms"] / row["after_ms"])
    # Timed also as the user deploys: the batch and threads a latency target is measured at.
    code, stdout, err = _run([model_path, out, "--criterion", "l1", "--percentile", "50", "--bench",
                              "--latency-batch", "4", "--latency-threads", "2", "--report", report, "--overwrite"],
                             capsys)
    assert code == 0, err
    rows = json.loads(report.read_text())["latency"]
    assert {(r["batch"], r["threads"]) for r in rows} == {(b, t) for b in (1, 4, 32) for t in (1, 2)}


def test_a_closed_stdout_ends_quietly(tmp_path):
    """`onnx-ocnna inspect m.onnx | head -1`: the reader closes the pipe; no 'internal error',
    no traceback, no 'Exception ignored' at exit."""
    import subprocess
    import sys

    from graphs import GraphBuilder

    g = GraphBuilder(seed=0)
    model = g.model(["N", 3, 8, 8], g.relu(g.conv("x", 3, 8)))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    code = "import sys; from onnx_ocnna.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "inspect", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "internal error" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode == 141


def test_percentile_zero_alone_is_refused_before_scoring(tmp_path, capsys, monkeypatch):
    from graphs import GraphBuilder

    from onnx_ocnna import api

    g = GraphBuilder(seed=0)
    path = tmp_path / "m.onnx"
    onnx.save(g.model(["N", 3, 8, 8], g.relu(g.conv("x", 3, 8))), path)
    monkeypatch.setattr(api, "score", lambda *a, **k: (_ for _ in ()).throw(AssertionError("scored")))
    data = tmp_path / "x.npy"
    np.save(data, np.zeros((4, 3, 8, 8), np.float32))
    code = main([str(path), str(tmp_path / "o.onnx"), "--calib", str(data), "--percentile", "0"])
    assert code != 0 and "--percentile 0 removes no channel" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def _digits_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Class sub-folders of 8x8 grayscale PNGs (0-255 = the model's 0-1 pixels)."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image[0] * 255).astype(np.uint8), mode="L").save(root / str(label) / f"{i}.png")
    return root


def test_recommended_command_on_a_folder_asks_for_the_preprocessing(tmp_path, capsys, digits):
    model, split, images, labels = digits
    save_model(model, tmp_path / "in.onnx")
    folder = _digits_folder(tmp_path / "calib", images[split["calibration"]][:40], labels[split["calibration"]][:40])
    code, out, err = _run([tmp_path / "in.onnx", tmp_path / "out.onnx", "--calib", folder, "--target-latency", "0.5"],
                          capsys)
    line = _one_line_error(code, err)
    assert "needs its preprocessing: --preprocess cifar10|imagenet|imagenet-32|raw" in line
    assert not (tmp_path / "out.onnx").exists()


def test_original_near_chance_is_warned_before_the_table(tmp_path, capsys, digits):
    model, split, images, labels = digits
    save_model(model, tmp_path / "in.onnx")
    calib = split["calibration"]
    folder = _digits_folder(tmp_path / "calib", images[calib], labels[calib])
    common = [tmp_path / "in.onnx", tmp_path / "out.onnx", "--calib", folder, "--criterion", "l1", "--quiet",
              "--no-reconstruct", "--overwrite"]
    import warnings

    code, out, err = _run(common + ["--preprocess", "raw"], capsys)
    assert code == 0 and "warning" not in err
    # Statistics of another data set: the original keeps 27 % top-1, 78 % of it on one class.
    with pytest.warns(UserWarning, match="the original model scores") as caught:
        code, out, err = _run(common + ["--mean", "0.5", "--std", "0.25"], capsys)
    assert code == 0
    (warning,) = [w for w in caught if "original model" in str(w.message)]
    assert "preprocessing is probably wrong" in str(warning.message)
    # The command line prints it as one line, without a source location.
    line = warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno)
    assert line.startswith("onnx-ocnna: warning: the original model scores") and line.count("\n") == 1


def test_cli_budget_defaults_are_the_library_defaults():
    """The CLI spells the damage-sample default as a literal (it must not import the library to
    build its parser): it must stay the library's."""
    import inspect

    from onnx_ocnna import api
    from onnx_ocnna.allocate import DEFAULT_DAMAGE_SAMPLES, DAMAGE_WORK_LIMIT, MIN_DAMAGE_SAMPLES
    from onnx_ocnna.cli import build_parser

    parser = build_parser()["main"]
    args = parser.parse_args(["in.onnx", "out.onnx"])
    # Unset means the library's choice (512, fewer for a large model), whose numbers the help spells out.
    assert args.damage_samples is None
    assert inspect.signature(api.compress).parameters["damage_samples"].default is None
    help_text = " ".join(parser.format_help().split())
    assert (DEFAULT_DAMAGE_SAMPLES, MIN_DAMAGE_SAMPLES, DAMAGE_WORK_LIMIT) == (512, 64, 2.5e13)
    assert "default 512" in help_text and "below 64" in help_text and "2.5e13" in help_text
    # --speed-floor unset leaves the library's default; given, it is passed on (0: MACs alone).
    from onnx_ocnna.allocate import DEFAULT_SPEED_FLOOR
    from onnx_ocnna.cli import _compress_options

    assert "speed_floor" not in _compress_options(args)
    assert inspect.signature(api.compress).parameters["speed_floor"].default == DEFAULT_SPEED_FLOOR == 0.8
    assert "default 0.8" in build_parser()["main"].format_help().replace("\n", " ").replace("  ", " ")
    given = build_parser()["main"].parse_args(["in.onnx", "out.onnx", "--speed-floor", "0"])
    assert _compress_options(given)["speed_floor"] == 0.0


def _uint8_nhwc_model() -> onnx.ModelProto:
    """:func:`_small_model` behind what tf2onnx writes for a model that normalises inside its
    graph: uint8 pixels [N, 8, 8, 3] -> Transpose -> Cast -> / 255."""
    from onnx import TensorProto, helper, numpy_helper

    model = _small_model()
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array([255.0], np.float32), "k255"))
    graph.node.insert(0, helper.make_node("Transpose", ["pixels"], ["pixels_nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
    graph.node.insert(1, helper.make_node("Cast", ["pixels_nchw"], ["pixels_float"], to=TensorProto.FLOAT, name="cast"))
    graph.node.insert(2, helper.make_node("Div", ["pixels_float", "k255"], ["x"], name="scale"))
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 8, 8, 3]))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_uint8_image_model_is_compressed_from_an_image_folder(tmp_path, capsys):
    """Before: 'model input has dtype uint8; images need a float input'."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    source = tmp_path / "u8.onnx"
    save_model(_uint8_nhwc_model(), source)
    out = tmp_path / "out.onnx"
    code, stdout, err = _run([source, out, "--calib", tmp_path, "--preprocess", "raw", "--target-macs", "0.6",
                              "--quiet"], capsys)
    assert code == 0, err
    written = load_model(out)
    assert written.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert ort_session(written).run(None, sample_feeds(written, batch=2))[0].shape == (2, 4)
    from onnx_ocnna.metrics import model_stats

    assert model_stats(written).macs <= 0.6 * model_stats(load_model(source)).macs
    assert "wrote" in stdout
