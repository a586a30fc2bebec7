"""Distillation checkpoints: the state after each epoch written atomically by rank 0, and restored on resume.

With ``checkpoint_dir`` set, after every epoch rank 0 writes ``checkpoint.pt`` atomically
(temporary file, then rename): epoch, trained parameters, optimiser state, schedule position,
chosen thread count, every rank's random-generator states (so a resumed run draws exactly what
the uninterrupted one would have) and the report so far. ``resume=True`` restores it and
continues with the next epoch; the epoch count may be raised (the cosine then stretches over
the new total). A checkpoint of another student or another number of processes is refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch

from onnx_ocnna import distributed
from onnx_ocnna.distill.records import DistillReport, EpochRecord
from onnx_ocnna.errors import InputError
from onnx_ocnna.model_io import atomic_output

if TYPE_CHECKING:
    from onnx_ocnna.distill.train import _Distiller

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "onnx-ocnna-distill-checkpoint/1"


def fingerprint(model: onnx.ModelProto) -> str:
    """The student's SHA-256, which a checkpoint must match to be resumed."""
    from onnx_ocnna.model_io import model_sha256

    return model_sha256(model)


def _path(d: _Distiller) -> Path:
    return Path(d.settings.checkpoint_dir) / CHECKPOINT_NAME


def save(d: _Distiller, epoch: int, report: DistillReport) -> None:
    """Rank 0 writes the state after ``epoch`` atomically; every rank waits for it."""
    rng = distributed.all_gather_object({"augment": d.gen.get_state(), "torch": torch.get_rng_state()})
    if d.primary:
        state = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "student_sha256": d.fingerprint,
            "processes": d.world.size,
            "params": {k: p.detach().clone() for k, p in d.module.params.items()},
            "bn_stats": {b: getattr(d.module, b).clone() for b in d.module.stat_buffers},
            "conv_norms": None if d.norms is None else {k: v.detach().clone()
                                                          for k, v in d.norms.state_dict().items()},
            "optimizer": d.optimizer.state_dict(),
            "step": d.step,
            "steps_per_epoch": d.step // epoch,
            "threads": d.threads.chosen,
            "rng": rng,
            "report": report.to_dict(),
        }
        path = _path(d)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            torch.save(state, tmp)
    distributed.barrier()

def restore(d: _Distiller, report: DistillReport) -> int:
    """Restore the checkpoint (read by rank 0, broadcast); returns the first epoch to run."""
    state, error = None, None
    if d.primary:
        path = _path(d)
        if path.exists():
            try:
                state = torch.load(path, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
                error = f"cannot read the checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else exc}"
            else:
                error = _mismatch(d, state, path)
        else:
            warnings.warn(f"no checkpoint in {path.parent}; distillation starts from epoch 1", stacklevel=4)
    state, error = distributed.broadcast_object((state, error))
    if error is not None:
        raise InputError(error)
    if state is None:
        return 1
    with torch.no_grad():
        for key, param in d.module.params.items():
            param.copy_(state["params"][key])
        for key, value in state.get("bn_stats", {}).items():
            getattr(d.module, key).copy_(value)
    if d.norms is not None and state.get("conv_norms"):
        d.norms.load_state_dict(state["conv_norms"])
    d.optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"][d.world.rank]
    d.gen.set_state(rng["augment"])
    torch.set_rng_state(rng["torch"])
    d.step = int(state["step"])
    d.total_steps = int(state["steps_per_epoch"]) * d.settings.epochs or None
    if state["threads"] is not None:
        d.threads.chosen = int(state["threads"])
        d.teacher.set_threads(d.threads.chosen)
    saved = state["report"]
    report.epochs = [EpochRecord(**e) for e in saved["epochs"]]
    report.initial_agreement = saved["initial_agreement"]
    report.initial_accuracy = saved["initial_accuracy"]
    report.teacher_accuracy = saved["teacher_accuracy"]
    for key in ("bn_recomputed_samples", "bn_recomputed_agreement", "bn_recomputed_accuracy"):
        setattr(report, key, saved.get(key, getattr(report, key)))
    report.settings["resumed_after_epoch"] = int(state["epoch"])
    return int(state["epoch"]) + 1

def _mismatch(d: _Distiller, state: dict, path: Path) -> str | None:
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        return f"{path} is not an onnx-ocnna distillation checkpoint"
    if state["student_sha256"] != d.fingerprint:
        return f"the checkpoint {path} belongs to another student model"
    if state["processes"] != d.world.size:
        return (f"the checkpoint {path} was written by {state['processes']} process(es); resume with the same "
                f"number, not {d.world.size}")
    if set(state["params"]) != set(d.module.params):
        return f"the checkpoint {path} holds other parameters than the student"
    return None
