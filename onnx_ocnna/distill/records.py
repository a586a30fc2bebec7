"""What a distillation run takes and gives: its settings, the batch protocol and the per-epoch report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from onnx_ocnna.errors import InputError

BN_MODES = ("frozen", "recompute", "train")


class BatchLike(Protocol):
    """Structural type of :class:`onnx_ocnna.calibration.Batch`."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None


@dataclass
class EpochRecord:
    """One training epoch. Agreement = top-1 of the student equals top-1 of the teacher."""

    epoch: int
    loss: float
    kd_loss: float
    ce_loss: float | None
    train_agreement: float
    eval_agreement: float | None
    eval_accuracy: float | None
    lr: float
    samples: int
    seconds: float


@dataclass
class DistillReport:
    """Per-epoch history plus the state before training (``initial_*``, on ``eval_batches``)."""

    epochs: list[EpochRecord] = field(default_factory=list)
    initial_agreement: float | None = None
    initial_accuracy: float | None = None
    teacher_accuracy: float | None = None
    bn_recomputed_samples: int = 0
    bn_recomputed_agreement: float | None = None
    bn_recomputed_accuracy: float | None = None
    check_max_diff: float | None = None
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def loss(self) -> list[float]:
        return [e.loss for e in self.epochs]

    @property
    def agreement(self) -> list[float | None]:
        return [e.eval_agreement for e in self.epochs]

    @property
    def accuracy(self) -> list[float | None]:
        return [e.eval_accuracy for e in self.epochs]

    def to_dict(self) -> dict:
        return asdict(self)



@dataclass
class DistillSettings:
    """Every knob of :func:`distill` (recorded in the report)."""

    epochs: int = 1
    lr: float = 0.01
    temperature: float = 4.0
    alpha: float = 0.5
    augment: bool = True
    hflip: bool = True
    weight_decay: float = 1e-4
    momentum: float = 0.9
    optimizer: str = "sgd"
    bn: str = "train"
    clip_grad_norm: float | None = 5.0
    steps_per_epoch: int | None = None
    output: str | None = None
    threads: int | None = None
    progress: bool = True
    seed: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False

    def validate(self) -> None:
        if self.epochs < 1:
            raise InputError(f"epochs must be at least 1, got {self.epochs}")
        if self.lr <= 0 or self.temperature <= 0 or self.alpha < 0:
            raise InputError("lr and temperature must be positive and alpha non-negative")
        if self.optimizer not in ("sgd", "adamw"):
            raise InputError(f"unknown optimizer {self.optimizer!r}; choose sgd or adamw")
        if self.bn not in BN_MODES:
            raise InputError(f"unknown BatchNormalization mode {self.bn!r}; choose {', '.join(BN_MODES)}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be at least 1, got {self.threads}")
        if self.resume and not self.checkpoint_dir:
            raise InputError("resuming needs the checkpoint directory of the interrupted run")
