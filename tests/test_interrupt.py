"""One Ctrl-C stops a run promptly, exits 130 and leaves no output and no temporary file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder
from onnx import numpy_helper

from onnx_ocnna.calibration import Batch
from onnx_ocnna.collect import GLUE_ROWS, collect
from onnx_ocnna.criteria.base import Accumulator

REPO = Path(__file__).resolve().parents[1]
# One SIGINT must end the run within this; generous for a loaded CI machine (the bug hung forever).
STOP_SECONDS = 10.0


def _heavy_model(channels: int = 48, layers: int = 6, size: int = 64) -> onnx.ModelProto:
    """A plain conv net that takes ONNX Runtime some tens of ms per image, so that scoring a few
    hundred images lasts several seconds; weights He-scaled so activations stay finite."""
    g = GraphBuilder(seed=0)
    x = g.relu(g.conv("x", 3, channels, name="c0"))
    for i in range(1, layers):
        x = g.relu(g.conv(x, channels, channels, name=f"c{i}"))
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [x])[0]])[0], channels, 4, name="fc")
    for init in g.inits:
        if init.name.endswith(".w") and init.name.startswith("c"):
            w = numpy_helper.to_array(init)
            scaled = w / w.std() * np.sqrt(2.0 / np.prod(w.shape[1:]))
            init.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), init.name))
    return g.model(["N", 3, size, size], out)


@pytest.fixture(scope="module")
def heavy(tmp_path_factory) -> tuple[Path, Path]:
    """(model path, calibration .npy path) for runs that last long enough to be interrupted."""
    from onnx_ocnna.model_io import save_model

    folder = tmp_path_factory.mktemp("heavy")
    model, calib = folder / "m.onnx", folder / "calib.npy"
    save_model(_heavy_model(), model)
    np.save(calib, np.random.default_rng(0).standard_normal((384, 3, 64, 64)).astype(np.float32))
    return model, calib


def _interrupt_when(argv: list, ready: Callable[[str], bool], cwd: Path) -> tuple[int, str, float]:
    """Run the CLI in ``cwd``, send ONE SIGINT once ``ready(stderr so far)`` holds (polled), and
    return (exit status, stderr, seconds from the signal to the exit)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # A runner started in the background may ignore SIGINT, and a child inherits that; Python
    # installs its KeyboardInterrupt handler only when SIGINT is at its default on start-up.
    proc = subprocess.Popen([sys.executable, "-m", "onnx_ocnna.cli", *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    chunks: list[bytes] = []

    def read() -> None:  # tqdm ends its lines with \r, so read raw chunks, not lines
        while chunk := os.read(proc.stderr.fileno(), 4096):
            chunks.append(chunk)

    def err() -> str:
        return b"".join(chunks).decode(errors="replace")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while not ready(err()):
            if proc.poll() is not None:
                reader.join(5)
                pytest.fail(f"the run ended before the phase to interrupt:\n{err()}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            code = proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"one SIGINT did not stop the run within {STOP_SECONDS:g} s")
        elapsed = time.monotonic() - sent
        reader.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, err(), elapsed


def _assert_stopped_cleanly(code: int, err: str, folder: Path, written: list[str]) -> None:
    assert code == 130, err
    assert "onnx-ocnna: interrupted; nothing was written" in err, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    for name in written:
        assert not (folder / name).exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_one_sigint_stops_scoring(heavy, tmp_path):
    model, calib = heavy
    code, err, seconds = _interrupt_when([model, "out.onnx", "--calib", calib, "--criterion", "apoz",
                                          "--report", "r.json"], lambda err: "scoring (" in err, tmp_path)
    _assert_stopped_cleanly(code, err, tmp_path, ["out.onnx", "r.json"])
    assert seconds < STOP_SECONDS


def test_one_sigint_stops_reconstruction(heavy, tmp_path):
    model, calib = heavy
    code, err, _ = _interrupt_when([model, "out.onnx", "--calib", calib, "--criterion", "l1",
                                    "--reconstruct-samples", "384"], lambda err: "reconstruct" in err, tmp_path)
    _assert_stopped_cleanly(code, err, tmp_path, ["out.onnx"])


def test_one_sigint_during_quantization_leaves_no_float_model_either(heavy, tmp_path):
    """The float model (OUT.fp32.onnx) was written before calibrating the INT8 one, so an
    interrupt there left it behind under 'nothing was written'."""
    model, calib = heavy

    def quantizing(err: str) -> bool:  # the quantizer's temporary output beside OUT exists
        return any(p.name.startswith(".out.") for p in tmp_path.iterdir())

    code, err, _ = _interrupt_when([model, "out.onnx", "--calib", calib, "--criterion", "l1", "--no-reconstruct",
                                    "--quantize", "int8"], quantizing, tmp_path)
    _assert_stopped_cleanly(code, err, tmp_path, ["out.onnx", "out.fp32.onnx"])


class _Interrupting(Accumulator):
    """Raises KeyboardInterrupt on its second batch, as a Ctrl-C during the statistics would."""

    def __init__(self) -> None:
        self.batches = 0

    def update(self, activations: np.ndarray, labels: np.ndarray | None = None) -> None:
        self.batches += 1
        if self.batches == 2:
            raise KeyboardInterrupt

    def merge(self, other: Accumulator) -> None:
        raise NotImplementedError

    def scores(self) -> np.ndarray:
        raise NotImplementedError


def test_collect_interrupted_stops_its_worker():
    """The worker must not stay blocked on the full queue (the main thread then waited on it forever)."""
    from onnx_ocnna import api
    from onnx_ocnna.criteria import get_criterion

    g = GraphBuilder(seed=0)
    model = g.model(["N", 3, 8, 8], g.conv(g.relu(g.conv("x", 3, 4, name="a")), 4, 2, name="b"))
    pruner = api.Pruner(model)
    member = next(m for group in pruner.analysis.groups if group.prunable for m in group.members)
    produced = []

    def batches():
        for i in range(1000):
            produced.append(i)
            # A batch of GLUE_ROWS rows is one item: smaller outputs would be grouped first.
            yield Batch({"x": np.zeros((GLUE_ROWS, 3, 8, 8), np.float32)}, None)

    before = set(threading.enumerate())
    raised: list[BaseException] = []

    def run() -> None:  # in a thread, so that the bug fails this test instead of hanging it
        try:
            collect(pruner.prepared_model(), pruner.analysis, get_criterion("apoz"), {member: _Interrupting()},
                    batches(), progress=False)
        except BaseException as exc:
            raised.append(exc)

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(STOP_SECONDS)
    assert not caller.is_alive(), "collect() did not return after its consumer was interrupted"
    assert len(raised) == 1 and isinstance(raised[0], KeyboardInterrupt)
    left = [t for t in set(threading.enumerate()) - before if t.is_alive() and t.name != "tqdm_monitor"]
    assert not left  # the worker has exited too
    assert len(produced) < 10  # and it stopped reading batches


def test_atomic_output_interrupted_leaves_nothing(tmp_path):
    from onnx_ocnna.model_io import atomic_output

    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "r.json") as tmp:
        tmp.write_text("{")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_interrupt_while_writing_says_what_was_written(tmp_path, capsys, monkeypatch):
    """The model is in place when the report's writing is interrupted: the message names it
    instead of claiming that nothing was written."""
    from onnx_ocnna.cli import main
    from onnx_ocnna.model_io import atomic_output, save_model
    from onnx_ocnna.report import Report

    def interrupted_save(self, path) -> None:
        with atomic_output(path) as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt

    monkeypatch.setattr(Report, "save", interrupted_save)
    g = GraphBuilder(seed=0)
    save_model(g.model(["N", 3, 8, 8], g.conv(g.relu(g.conv("x", 3, 8, name="a")), 8, 2, name="b")),
               tmp_path / "in.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main([str(tmp_path / "in.onnx"), str(out), "--criterion", "l1", "--report", str(report)]) == 130
    assert capsys.readouterr().err.strip() == f"onnx-ocnna: interrupted; only {out} was written"
    assert out.exists() and not report.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
