"""Scale-out under torchrun (issue 8): sharding, exact merging of statistics, DDP distillation,
checkpoints and resume.

The torchrun tests launch ``python -m torch.distributed.run --standalone --nproc_per_node=2`` on
CPU (gloo) with tests/_dist_driver.py, which runs the given ``onnx-ocnna`` command lines: through
the CLI once it has the torchrun wiring (``--checkpoint-dir``, ``--resume``), until then through
an emulation with the :mod:`onnx_ocnna.distributed` hooks where the CLI is to call them. The
three launches take about a minute on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_ocnna import distributed
from onnx_ocnna.errors import InputError

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("_dist_driver.py")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def fake_rank(monkeypatch):
    """Pretend to be rank ``r`` of ``w`` torchrun workers (no process group: sharding needs none)."""

    def set_rank(rank: int, size: int) -> None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(size))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(size))

    return set_rank


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------
# Without torchrun


def test_single_process_is_a_pass_through_without_torch() -> None:
    code = """
import sys
import numpy as np
from onnx_ocnna import distributed as d
batches = [1, 2, 3]
assert d.world() == d.World() and not d.launched() and d.is_primary()
assert d.shard(batches) is batches and list(d.round_robin(batches)) == batches
acc = {"a": object()}
assert d.gather_accumulators(acc) is acc and d.broadcast_object(7) == 7 and d.all_sum(3) == 3
d.init(); d.barrier(); d.destroy()
assert "torch" not in sys.modules, "torch was imported"
"""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Sharding


@pytest.mark.parametrize("size", [2, 3, 4])
def test_scoring_shards_are_disjoint_contiguous_and_complete(fake_rank, size: int) -> None:
    for count in range(size, 12):
        parts = []
        for rank in range(size):
            fake_rank(rank, size)
            parts.append(list(distributed.shard(list(range(count)))))
            # Unknown length (a reader): round robin, still disjoint and complete.
            assert list(distributed.shard(iter(range(count)))) == list(range(rank, count, size))
        assert sum(parts, []) == list(range(count))  # rank order = the single-process order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_too_few_batches_for_the_processes(fake_rank) -> None:
    fake_rank(1, 3)
    with pytest.raises(InputError, match="fewer than the 3 processes"):
        distributed.shard([0, 1])


@pytest.mark.parametrize("size", [2, 3, 4])
def test_training_shards_follow_distributed_sampler(fake_rank, size: int) -> None:
    torch_data = pytest.importorskip("torch.utils.data")
    for count in range(1, 12):
        for rank in range(size):
            sampler = torch_data.DistributedSampler(range(count), num_replicas=size, rank=rank, shuffle=False)
            expected = list(sampler)
            assert distributed.strided(count, rank, size) == expected
            fake_rank(rank, size)
            assert list(distributed.round_robin(iter(range(count)))) == expected


def _array_source(n: int = 50, batch: int = 8):
    from onnx_ocnna.calibration import open_calibration
    from onnx_ocnna.demo import digits_model_and_data

    model, data = digits_model_and_data()
    rng = np.random.default_rng(0)
    arrays = {"input": rng.standard_normal((n, 1, 8, 8)).astype(np.float32), "labels": np.arange(n) % 10}
    return model, open_calibration(arrays, model, batch_size=batch)


def _folder_source(tmp_path: Path, n: int = 21, batch: int = 4):
    from PIL import Image

    from onnx_ocnna.calibration import open_calibration
    from onnx_ocnna.demo import digits_model_and_data

    model, _ = digits_model_and_data()
    rng = np.random.default_rng(1)
    for i in range(n):
        folder = tmp_path / f"class{i % 3}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return model, open_calibration(str(tmp_path), model, batch_size=batch, preprocess="raw")


def _batches_equal(a, b) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.feeds.keys() == y.feeds.keys()
        for key in x.feeds:
            np.testing.assert_array_equal(x.feeds[key], y.feeds[key])
        np.testing.assert_array_equal(x.labels, y.labels)


@pytest.mark.parametrize("kind", ["arrays", "folder"])
def test_shard_source_reads_only_its_own_batches(fake_rank, tmp_path: Path, kind: str) -> None:
    model, source = _array_source() if kind == "arrays" else _folder_source(tmp_path)
    whole = list(source.batches())
    count = len(source)
    for size in (2, 3):
        rows = 0
        for rank in range(size):
            fake_rank(rank, size)
            part = distributed.shard_source(source)
            assert type(part) is type(source)  # a real sub-source, not a filter over everything
            rows += part.num_samples
            _batches_equal(part.batches(), distributed.shard(iter(whole), count))
            _batches_equal(part.batches(), [whole[i] for i in distributed.block(count, rank, size)])
            # Training: the DistributedSampler indices, padding included.
            picked = distributed.subset_source(source, distributed.strided(count, rank, size))
            _batches_equal(picked.batches(), [whole[i] for i in distributed.strided(count, rank, size)])
        assert rows == source.num_samples


# ---------------------------------------------------------------------------------------------
# Merging statistics


def _accumulate(criterion, options: dict, batches, labels) -> dict:
    from onnx_ocnna.criteria import MemberInfo, get_criterion

    crit = get_criterion(criterion, **options)
    acc = crit.new_accumulator(MemberInfo("conv", np.zeros((6, 1)), 6))
    for x, y in zip(batches, labels):
        acc.update(x, y)
    return {"conv": acc}


@pytest.mark.parametrize("criterion, options", [
    ("ocnna", {"invert": True}), ("ocnna", {"pca_variance": 1.0}), ("apoz", {}), ("mean-activation", {}),
    ("si", {"si_max_samples": 40}),
])
def test_rank_order_merge_reproduces_one_pass(criterion: str, options: dict) -> None:
    rng = np.random.default_rng(0)
    batches = [np.maximum(rng.standard_normal((8, 6, 5, 4)) * rng.uniform(0.2, 2, (1, 6, 1, 1)), 0) for _ in range(9)]
    labels = [rng.integers(0, 3, 8) for _ in range(9)]
    single = _accumulate(criterion, options, batches, labels)["conv"].scores()
    for size in (2, 3):
        ranks = [_accumulate(criterion, options, [batches[i] for i in distributed.block(9, r, size)],
                             [labels[i] for i in distributed.block(9, r, size)]) for r in range(size)]
        states = [{k: a.state() for k, a in part.items()} for part in ranks]
        merged = distributed.merge_states(ranks[0], states, options)["conv"].scores()
        if criterion == "si":  # per-sample features: same order, same subsample, same greedy choice
            np.testing.assert_array_equal(merged, single)
        else:
            np.testing.assert_allclose(merged, single, rtol=1e-12)
    if options.get("invert"):  # the option survived the round trip through state()
        assert (single >= 1).all()


def test_merge_rejects_mismatched_members() -> None:
    part = _accumulate("apoz", {}, [np.ones((2, 6, 3, 3))], [None])
    with pytest.raises(InputError, match="same model"):
        distributed.merge_states(part, [{"conv": part["conv"].state()}, {"other": part["conv"].state()}])


# ---------------------------------------------------------------------------------------------
# Checkpoints in one process


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def digits_kd():
    from onnx_ocnna import api
    from onnx_ocnna.calibration import open_calibration
    from onnx_ocnna.demo import digits_model_and_data

    model, data = digits_model_and_data()
    pruned, _ = api.compress(model, data["calibration"], percentile=40, progress=False)
    train = open_calibration(data["train"], model, batch_size=128)
    return model, pruned, train


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_checkpoint_resume_in_one_process_is_exact(digits_kd, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from onnx_ocnna.distill import distill

    teacher, student, train = digits_kd
    common = dict(epochs=3, hflip=False, threads=1, progress=False)
    reference, ref_report = distill(student, teacher, train.batches, **common)

    def stop_after_two(record):
        if record.epoch == 2:
            raise _Stop

    with pytest.raises(_Stop):
        distill(student, teacher, train.batches, checkpoint_dir=tmp_path, epoch_callback=stop_after_two, **common)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 2 and len(saved["report"]["epochs"]) == 2
    resumed, report = distill(student, teacher, train.batches, checkpoint_dir=tmp_path, resume=True, **common)
    assert report.settings["resumed_after_epoch"] == 2
    assert [e.epoch for e in report.epochs] == [1, 2, 3]
    for name, value in _weights(reference).items():
        np.testing.assert_array_equal(_weights(resumed)[name], value, err_msg=name)
    assert report.epochs[0].loss == ref_report.epochs[0].loss
    # Raising the epoch count continues the finished run.
    longer, report = distill(student, teacher, train.batches, checkpoint_dir=tmp_path, resume=True,
                             **{**common, "epochs": 4})
    assert report.settings["resumed_after_epoch"] == 3 and [e.epoch for e in report.epochs] == [1, 2, 3, 4]
    assert not np.array_equal(_weights(longer)["conv2.weight"], _weights(reference)["conv2.weight"])


def test_checkpoint_refuses_another_student(digits_kd, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from onnx_ocnna.distill import distill

    teacher, student, train = digits_kd
    distill(student, teacher, train.batches, epochs=1, threads=1, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(InputError, match="another student"):
        distill(teacher, teacher, train.batches, epochs=2, threads=1, progress=False, checkpoint_dir=tmp_path,
                resume=True)
    with pytest.raises(InputError, match="checkpoint directory"):
        distill(student, teacher, train.batches, resume=True, progress=False)
    with pytest.warns(UserWarning, match="no checkpoint"):
        _, report = distill(student, teacher, train.batches, epochs=1, threads=1, progress=False,
                            checkpoint_dir=tmp_path / "empty", resume=True)
    assert "resumed_after_epoch" not in report.settings


# ---------------------------------------------------------------------------------------------
# Two processes under torchrun


def _gloo_available() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


torchrun = pytest.mark.skipif(not _gloo_available(), reason="needs torch.distributed with gloo")


def _torchrun(commands: list[list[str]], dump: Path, die_after_epoch: int | None = None):
    dump.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(DRIVER),
           "--dump-dir", str(dump)]
    if die_after_epoch is not None:
        cmd += ["--die-after-epoch", str(die_after_epoch)]
    for command in commands:
        cmd += ["--", *command]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    ranks = [json.loads(p.read_text()) if p.exists() else None for p in (dump / "rank0.json", dump / "rank1.json")]
    return result, ranks


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from onnx_ocnna.demo import digits_model_and_data

    root = tmp_path_factory.mktemp("dist")
    model, data = digits_model_and_data()
    onnx.save(model, root / "digits.onnx")
    for split, arrays in data.items():
        np.savez(root / f"{split}.npz", **arrays)
    return root


SCORE_RUNS = {"ocnna": [], "invert": ["--invert"], "si": ["--criterion", "si"]}


def _score_args(files: Path, name: str, out: Path) -> list[str]:
    return ["score", str(files / "digits.onnx"), "-o", str(out), "--calib", str(files / "calibration.npz"),
            "--batch-size", "32", "--quiet", *SCORE_RUNS[name]]


def _pipeline_args(files: Path, out: Path, checkpoints: Path, *extra: str) -> list[str]:
    return [str(files / "digits.onnx"), str(out), "--calib", str(files / "calibration.npz"), "--distill",
            "--train", str(files / "train.npz"), "--eval", str(files / "test.npz"), "--epochs", "2", "--no-flip",
            "--batch-size", "64", "--checkpoint-dir", str(checkpoints), "--quiet", *extra]


@pytest.fixture(scope="module")
def first_launch(files):
    """One torchrun launch: the three scoring runs, then an uninterrupted 2-epoch distillation."""
    commands = [_score_args(files, name, files / f"plan2_{name}.json") for name in SCORE_RUNS]
    commands.append(_pipeline_args(files, files / "distilled.onnx", files / "ck_a"))
    result, ranks = _torchrun(commands, files / "dump_a")
    assert result.returncode == 0, result.stderr[-3000:]
    return ranks


def _plan_scores(group: dict) -> np.ndarray:
    return np.array([np.nan if s is None else float(s) for s in group["scores"]])  # null: non-finite


@torchrun
def test_two_process_plans_equal_the_single_process_plans(files, first_launch) -> None:
    from onnx_ocnna.cli import main

    for name in SCORE_RUNS:
        single = files / f"plan1_{name}.json"
        assert main(_score_args(files, name, single)) == 0
        one, two = json.loads(single.read_text()), json.loads((files / f"plan2_{name}.json").read_text())
        assert two["calibration_samples"] == one["calibration_samples"] == 270
        assert len(one["groups"]) == len(two["groups"]) > 0
        for g1, g2 in zip(one["groups"], two["groups"]):
            assert g1["members"] == g2["members"]
            assert g1["remove"] == g2["remove"], (name, g1["id"])
            if "scores" in g1:
                np.testing.assert_allclose(_plan_scores(g2), _plan_scores(g1), rtol=1e-9)
    # Each rank really scored only its share: 270 samples in batches of 32 are 9 batches, 5 + 4.
    counts = [r["collected_samples"][:3] for r in first_launch]
    assert counts == [[160] * 3, [110] * 3]


@torchrun
def test_distillation_replicas_agree_and_the_model_is_valid(files, first_launch) -> None:
    rank0, rank1 = first_launch
    assert rank0["weights_sha256"] == rank1["weights_sha256"]  # DDP kept the replicas identical
    assert rank0["epochs"] == rank1["epochs"] == [1, 2] and rank0["processes"] == 2
    _check_written_model(files / "distilled.onnx", files, rank0["weights_sha256"])


def _check_written_model(path: Path, files: Path, sha256: str) -> None:
    """Valid ONNX, the weights rank 0 returned, the pruned size, and a working classifier in ORT."""
    from _dist_driver import weights_sha256

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert weights_sha256(model) == sha256
    original = onnx.load(str(files / "digits.onnx"))
    size = lambda m: sum(onnx.numpy_helper.to_array(t).size for t in m.graph.initializer)  # noqa: E731
    assert size(model) < 0.8 * size(original)
    test = np.load(files / "test.npz")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    accuracy = (session.run(None, {"input": test["input"]})[0].argmax(1) == test["labels"]).mean()
    assert accuracy > 0.8


@torchrun
def test_killed_run_resumes_from_the_last_epoch(files, first_launch) -> None:
    torch = pytest.importorskip("torch")
    out, checkpoints = files / "resumed.onnx", files / "ck_b"
    result, _ = _torchrun([_pipeline_args(files, out, checkpoints)], files / "dump_b", die_after_epoch=1)
    assert result.returncode != 0 and "SIGKILL" in result.stderr  # both ranks killed after epoch 1
    assert not out.exists()
    assert torch.load(checkpoints / "checkpoint.pt", weights_only=True)["epoch"] == 1

    result, ranks = _torchrun([_pipeline_args(files, out, checkpoints, "--resume")], files / "dump_c")
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in ranks:
        assert rank["resumed_after_epoch"] == 1 and rank["epochs"] == [1, 2]
        # Bit for bit what the uninterrupted run of first_launch produced.
        assert rank["weights_sha256"] == first_launch[0]["weights_sha256"]
    assert torch.load(checkpoints / "checkpoint.pt", weights_only=True)["epoch"] == 2
    _check_written_model(out, files, ranks[0]["weights_sha256"])
