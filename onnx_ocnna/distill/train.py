"""Knowledge distillation of a pruned ONNX graph from its original (SPEC section 7).

The student is the pruned graph run by :class:`~onnx_ocnna.distill.torch_graph.OnnxModule`
with its initializers as parameters; the teacher is the original model. The trained values
are written back into the student's own initializers and ONNX Runtime must agree with
PyTorch before the model is returned.

Choices:

* **Teacher in ONNX Runtime**, not PyTorch: it is frozen, so it needs no autograd, and ORT
  runs it about 3x faster than eager PyTorch on CPU (ResNet-56, batch 128, one thread:
  0.28 s against 0.82 s; a student step, forward and backward, took 2.6 s). It is also the
  reference runtime, so the targets cannot carry a converter error.
* **Loss** = T^2 * KL(softmax(t/T) || softmax(s/T)) + alpha * CE(s, y) when the batch has
  labels, else the KD term alone. ``alpha = 0.5``: the labels of a calibration set are real
  information the teacher may get wrong, but matching the teacher stays the main objective.
* **Optimiser**: SGD, momentum 0.9 (Nesterov), lr 0.01, weight decay 1e-4 on weights with
  two or more dimensions only (not on BatchNorm scale/bias or biases), cosine decay to 0 over
  all steps, gradient norm clipped to 5. With BatchNorm statistics frozen nothing renormalises
  the activations, so the first steps on a badly damaged student can blow up: without the clip
  lr 0.01 diverged (NaN) on ResNet-20 and collapsed the digits CNN. Measured on ResNet-20
  (CIFAR-10 JPEGs, 40 % of the block-internal filters zeroed, 2,000 training images, 2 epochs,
  agreement with the teacher on 1,000 test images, 0.418 before): SGD 0.01 + clip 0.785,
  SGD 0.003 0.757, AdamW 1e-3 0.785, AdamW 3e-4 0.760. ``optimizer="adamw"`` is available;
  on the pruned ResNet-20 of the BatchNorm measurements below AdamW 1e-3 lost to SGD 0.01
  (59.05 % against 65.55 % folded and frozen; 73.05 % against 75.30 % BN-kept, ``bn="train"``).
  When the number of batches per epoch is unknown the first epoch runs at the initial rate
  and the cosine starts once it has been counted.
* **BatchNormalization** (``bn``): ``"frozen"`` keeps the running statistics as
  given, so training and the written-back graph compute the same function. Pruning changes
  what every BatchNorm receives, though, and frozen statistics then normalise with stale
  values. ``"recompute"`` re-estimates them once before training (one pass over the training
  data, no augmentation, no gradient; the average of the batch statistics, as
  ``torch.optim.swa_utils.update_bn`` does) and keeps them frozen afterwards. ``"train"``
  re-estimates them and then trains with batch statistics, the running ones following with
  momentum 0.1, and writes them into the graph; a Conv whose BatchNorm the exporter folded
  away gets a temporary one (:mod:`~onnx_ocnna.distill.conv_norm`), folded back into its
  weight and bias; it starts from the teacher's channel statistics when the student is an
  untrained pruned copy of the teacher (the repair ``"recompute"`` gives a kept BatchNorm),
  else as the identity. Under torchrun each rank normalises with its own batches and the
  running statistics are averaged over the ranks after each epoch.
  Measured (ResNet-20, ``ocnna`` k = 40, 3 epochs x 10,000 CIFAR-10 training JPEGs, SGD 0.01,
  top-1 on 2,000 test images, 80.30 % before pruning; docs/results/kd_resnet20_tuning2.json):
  BN-kept export frozen 66.85 %, recompute 70.60 %, train 75.30 %; BN-folded export frozen
  65.55 %, train 73.95 % (70.15 % with the temporary BatchNorms started as the identity).
  Batch statistics also tolerate larger steps: BN-kept lr 0.02 gave 76.00 %, lr 0.05 74.10 %,
  where the folded, frozen student collapsed to a constant prediction at lr 0.05.
  ``"train"`` is the default: 8-8.5 points better than ``"frozen"`` on both exports.
* **Augmentation** (4D image inputs, ``augment=True``): random crop after zero padding of
  4 px per 32 px of the shorter side (at least 1), and a horizontal flip with probability 0.5
  (``hflip=False`` for data where a mirror image changes the class, such as digits). The
  teacher sees the same augmented images, so the KD targets stay consistent. The layout
  (NCHW / NHWC) comes from the model's declared input shape, else from the array's shape.
* **Threads**: at most the CPUs this process may use; with ``threads=None`` the first steps
  are timed with 1 and with all of them and the faster count is kept (:class:`_ThreadChooser`).
* **Evaluation** (``eval_batches``) runs the written-back student in ONNX Runtime: the
  numbers describe the file the user gets.
* **Several processes** (under torchrun, :mod:`onnx_ocnna.distributed`): the student is wrapped
  in ``DistributedDataParallel`` (gradients averaged over the ranks, so one step sees W batches
  at the same learning rate and an epoch has ceil(K / W) steps instead of K); the K batches are
  dealt out as ``DistributedSampler(shuffle=False)`` would, at batch granularity
  (:func:`~onnx_ocnna.distributed.strided`). Each rank runs the teacher on its own batches; rank 0
  alone evaluates and writes checkpoints, and every rank returns the same model and report.
  Without a thread count each rank uses its share of the node's CPUs.
* **Random streams** (augmentation, dropout): rank 0 uses ``seed`` as a single process does,
  the other ranks seeds derived from (seed, rank), so they draw different crops.
* **Checkpoints** (``checkpoint_dir``): after every epoch rank 0 writes ``checkpoint.pt``
  atomically (temporary file, then rename): epoch, trained parameters, optimiser state, schedule
  position, chosen thread count, every rank's random-generator states (so a resumed run draws
  exactly what the uninterrupted one would have) and the report so far. ``resume=True`` restores it and
  continues with the next epoch; the epoch count may be raised (the cosine then stretches over
  the new total). A checkpoint of another student or another number of processes is refused.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from onnx_ocnna import distributed
from onnx_ocnna.distill.conv_norm import ConvNorms
from onnx_ocnna.distill.torch_graph import OnnxModule, as_tensor
from onnx_ocnna.distill.writeback import check_agreement, write_back
from onnx_ocnna.errors import InputError
from onnx_ocnna.model_io import atomic_output

CHECKPOINT_NAME = "checkpoint.pt"
BN_MODES = ("frozen", "recompute", "train")
_CHECKPOINT_FORMAT = "onnx-ocnna-distill-checkpoint/1"


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


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def distill(
    student: onnx.ModelProto,
    teacher: onnx.ModelProto,
    train_batches: Callable[[], Iterable[BatchLike]],
    *,
    epochs: int = 1,
    lr: float = 0.01,
    temperature: float = 4.0,
    alpha: float = 0.5,
    augment: bool = True,
    hflip: bool = True,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    optimizer: str = "sgd",
    bn: str = "train",
    clip_grad_norm: float | None = 5.0,
    eval_batches: Callable[[], Iterable[BatchLike]] | None = None,
    steps_per_epoch: int | None = None,
    output: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    epoch_callback: Callable[[EpochRecord], None] | None = None,
) -> tuple[onnx.ModelProto, DistillReport]:
    """Fine-tune ``student`` to mimic ``teacher`` and return it with the same graph structure.

    Args:
        student: the pruned model; its float initializers are trained.
        teacher: the original model (same inputs; output of the same class count).
        train_batches: called once per epoch, yields batches whose ``feeds`` map input names to
            arrays [B, ...] and whose ``labels`` are [B] int64 or None.
        epochs, lr, momentum, weight_decay, optimizer ("sgd" or "adamw"), clip_grad_norm:
            optimisation; the rate follows a cosine to 0 over all steps.
        bn: BatchNormalization running statistics: "frozen" (as given), "recompute" (re-estimated
            on the training data before training, then frozen) or "train" (re-estimated, then
            batch statistics in training, with a temporary BatchNorm after every Conv whose
            BatchNorm was folded away); see the module docstring.
        temperature, alpha: the loss T^2 * KL + alpha * CE (CE only for labelled batches).
        augment, hflip: random crop (and horizontal flip) of 4D image inputs.
        eval_batches: held-out data, evaluated before training and after every epoch.
        steps_per_epoch: batches per epoch, if ``len()`` of the data cannot tell.
        output: name of the logits output [N, K] (or [N, K, ...]); default the first output.
        threads: CPU threads for torch and the teacher; None = choose (see the module docstring).
        progress: show a tqdm bar with the running loss and teacher agreement (rank 0 only).
        seed: seeds augmentation and dropout (the global torch RNG state is restored).
        checkpoint_dir: write ``checkpoint.pt`` here after every epoch (rank 0; created if needed).
        resume: continue from the checkpoint in ``checkpoint_dir`` (a fresh start if there is none).
        epoch_callback: called on every rank with each finished epoch's record, after its
            checkpoint is on disk.

    Under torchrun (:mod:`onnx_ocnna.distributed`) every rank calls this with the same arguments
    and data; see the module docstring.

    Returns:
        The distilled model (a new ModelProto) and the :class:`DistillReport`, the same on
        every rank; only rank 0 writes files (checkpoints).

    Raises:
        InputError: bad settings or data, an operator the converter lacks, or divergence.
        ValidationError: ONNX Runtime and PyTorch disagree on the distilled model.
    """
    settings = DistillSettings(
        epochs=epochs, lr=lr, temperature=temperature, alpha=alpha, augment=augment, hflip=hflip,
        weight_decay=weight_decay, momentum=momentum, optimizer=optimizer, bn=bn, clip_grad_norm=clip_grad_norm,
        steps_per_epoch=steps_per_epoch, output=output, threads=threads, progress=progress, seed=seed,
        checkpoint_dir=None if checkpoint_dir is None else os.fspath(checkpoint_dir), resume=resume,
    )
    settings.validate()
    saved_threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _Distiller(student, teacher, settings).run(train_batches, eval_batches, epoch_callback)
    finally:
        torch.set_num_threads(saved_threads)


class _Distiller:
    """State of one distillation run: student module, teacher session, optimiser, schedule."""

    def __init__(self, student: onnx.ModelProto, teacher: onnx.ModelProto, settings: DistillSettings) -> None:
        self.settings = settings
        self.world = distributed.init()
        self.primary = self.world.rank == 0
        self.student, self.teacher_model = student, teacher
        self.module = OnnxModule(student)
        self.norms: ConvNorms | None = None
        if settings.bn == "train":
            self.norms = ConvNorms(self.module, student)
            self.module.conv_norms = self.norms  # a submodule: DDP and write-back see it
        self.model: torch.nn.Module = self.module  # the DDP wrapper under torchrun
        self.out_index = _output_index(self.module.output_names, settings.output)
        cpus = available_cpus()
        if settings.threads:
            candidates = [settings.threads]
        elif self.world.distributed:  # the ranks on one node share its CPUs
            candidates = [distributed.cpu_share() or 1]
        else:
            candidates = sorted({cpus, 1}, reverse=True)
        self.threads = _ThreadChooser(candidates)
        self.teacher = _TeacherRunner(teacher, self.module.output_names[self.out_index], candidates[0])
        self.layouts = _input_layouts(student)
        rank_seed = settings.seed if self.primary else int(
            np.random.SeedSequence([settings.seed, self.world.rank]).generate_state(1)[0])
        self.gen = torch.Generator().manual_seed(rank_seed)
        if not self.primary:
            torch.manual_seed(rank_seed)  # dropout; distill() restores the caller's state
        decay = [p for p in self.module.params.values() if p.dim() > 1]
        no_decay = [p for p in self.module.params.values() if p.dim() <= 1]
        if self.norms is not None:
            no_decay += list(self.norms.parameters())
        self.params = decay + no_decay
        if not self.params:
            raise InputError("the student has no float initializers to train")
        groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if settings.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.momentum > 0
            )
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=settings.lr)
        self.total_steps: int | None = None
        self.step = 0
        self.sample_feeds: dict[str, np.ndarray] | None = None

    def run(
        self, train_batches: Callable[[], Iterable[BatchLike]], eval_batches: Callable[[], Iterable[BatchLike]] | None,
        epoch_callback: Callable[[EpochRecord], None] | None = None,
    ) -> tuple[onnx.ModelProto, DistillReport]:
        started = time.perf_counter()
        s = self.settings
        report = DistillReport(settings={**asdict(s), "schedule": "cosine", "teacher": "onnxruntime",
                                         "processes": self.world.size,
                                         "bn_layers": len(self.module.stat_buffers) // 2,
                                         "conv_norms": len(self.norms or ())})
        first = 1
        if s.checkpoint_dir is not None:
            self.fingerprint = _fingerprint(self.student)
            if s.resume:
                first = self._resume(report)
        torch.set_num_threads(self.threads.current())
        if self.world.distributed:
            self.model = _ddp(self.module)
        if eval_batches is not None and first == 1 and self.primary:
            report.initial_agreement, report.initial_accuracy, report.teacher_accuracy = self.evaluate(eval_batches())
        if s.bn != "frozen" and first == 1:
            report.bn_recomputed_samples = self.recompute_bn(train_batches)
            report.settings["conv_norms_from_teacher"] = len(self.norms.targets) if self.norms else 0
            if report.bn_recomputed_samples and eval_batches is not None and self.primary:
                report.bn_recomputed_agreement, report.bn_recomputed_accuracy, _ = self.evaluate(eval_batches())
        for epoch in range(first, s.epochs + 1):
            with warnings.catch_warnings():
                # Conv backward returns a [C, 1, k, k] weight gradient with another (equally valid)
                # stride on the size-1 axis than DDP's bucket; DDP copies it and warns.
                warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
                report.epochs.append(self.train_epoch(epoch, train_batches))
            rec = report.epochs[-1]
            if eval_batches is not None and self.primary:
                rec.eval_agreement, rec.eval_accuracy, _ = self.evaluate(eval_batches())
            if s.progress and self.primary:
                self._print_epoch(rec)
            if s.checkpoint_dir is not None:
                self._save_checkpoint(epoch, report)
            if epoch_callback is not None:
                epoch_callback(rec)
        self.module.eval()
        distilled = write_back(self.module, self.student)
        if self.primary:
            if self.sample_feeds is None:  # resumed after the last epoch: nothing was trained here
                self.sample_feeds = next(iter(train_batches())).feeds
            report.check_max_diff = check_agreement(distilled, self.module, self.sample_feeds)
        report.settings["threads"] = self.threads.current()
        report.seconds = time.perf_counter() - started
        return distilled, distributed.broadcast_object(report)

    # -- checkpoints -----------------------------------------------------------------------------

    def _checkpoint_path(self) -> Path:
        return Path(self.settings.checkpoint_dir) / CHECKPOINT_NAME

    def _save_checkpoint(self, epoch: int, report: DistillReport) -> None:
        """Rank 0 writes the state after ``epoch`` atomically; every rank waits for it."""
        rng = distributed.all_gather_object({"augment": self.gen.get_state(), "torch": torch.get_rng_state()})
        if self.primary:
            state = {
                "format": _CHECKPOINT_FORMAT,
                "epoch": epoch,
                "student_sha256": self.fingerprint,
                "processes": self.world.size,
                "params": {k: p.detach().clone() for k, p in self.module.params.items()},
                "bn_stats": {b: getattr(self.module, b).clone() for b in self.module.stat_buffers},
                "conv_norms": None if self.norms is None else {k: v.detach().clone()
                                                              for k, v in self.norms.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "steps_per_epoch": self.step // epoch,
                "threads": self.threads.chosen,
                "rng": rng,
                "report": report.to_dict(),
            }
            path = self._checkpoint_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as tmp:
                torch.save(state, tmp)
        distributed.barrier()

    def _resume(self, report: DistillReport) -> int:
        """Restore the checkpoint (read by rank 0, broadcast); returns the first epoch to run."""
        state, error = None, None
        if self.primary:
            path = self._checkpoint_path()
            if path.exists():
                try:
                    state = torch.load(path, weights_only=True)
                except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
                    error = f"cannot read the checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else exc}"
                else:
                    error = self._checkpoint_mismatch(state, path)
            else:
                warnings.warn(f"no checkpoint in {path.parent}; distillation starts from epoch 1", stacklevel=4)
        state, error = distributed.broadcast_object((state, error))
        if error is not None:
            raise InputError(error)
        if state is None:
            return 1
        with torch.no_grad():
            for key, param in self.module.params.items():
                param.copy_(state["params"][key])
            for key, value in state.get("bn_stats", {}).items():
                getattr(self.module, key).copy_(value)
        if self.norms is not None and state.get("conv_norms"):
            self.norms.load_state_dict(state["conv_norms"])
        self.optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"][self.world.rank]
        self.gen.set_state(rng["augment"])
        torch.set_rng_state(rng["torch"])
        self.step = int(state["step"])
        self.total_steps = int(state["steps_per_epoch"]) * self.settings.epochs or None
        if state["threads"] is not None:
            self.threads.chosen = int(state["threads"])
            self.teacher.set_threads(self.threads.chosen)
        saved = state["report"]
        report.epochs = [EpochRecord(**e) for e in saved["epochs"]]
        report.initial_agreement = saved["initial_agreement"]
        report.initial_accuracy = saved["initial_accuracy"]
        report.teacher_accuracy = saved["teacher_accuracy"]
        for key in ("bn_recomputed_samples", "bn_recomputed_agreement", "bn_recomputed_accuracy"):
            setattr(report, key, saved.get(key, getattr(report, key)))
        report.settings["resumed_after_epoch"] = int(state["epoch"])
        return int(state["epoch"]) + 1

    def _checkpoint_mismatch(self, state: dict, path: Path) -> str | None:
        if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
            return f"{path} is not an onnx-ocnna distillation checkpoint"
        if state["student_sha256"] != self.fingerprint:
            return f"the checkpoint {path} belongs to another student model"
        if state["processes"] != self.world.size:
            return (f"the checkpoint {path} was written by {state['processes']} process(es); resume with the same "
                    f"number, not {self.world.size}")
        if set(state["params"]) != set(self.module.params):
            return f"the checkpoint {path} holds other parameters than the student"
        return None

    # -- training --------------------------------------------------------------------------------

    def _epoch_batches(
        self, train_batches: Callable[[], Iterable[BatchLike]]
    ) -> tuple[Iterable[BatchLike], int | None]:
        """This rank's batches of one epoch and how many there are (None when unknown)."""
        s = self.settings
        source = getattr(train_batches, "__self__", None)
        if not self.world.distributed:
            iterable = train_batches()
            return iterable, s.steps_per_epoch or _length(iterable) or _length(source)
        rank, size = self.world.rank, self.world.size
        count = _length(source)
        if count:
            part = distributed.subset_source(source, distributed.strided(count, rank, size))
            if part is not None:  # reads only this rank's images
                return part.batches(), len(part)
        count = count or s.steps_per_epoch
        per_rank = math.ceil(count / size) if count else None
        return distributed.round_robin(train_batches(), _copy_batch), per_rank

    def recompute_bn(self, train_batches: Callable[[], Iterable[BatchLike]]) -> int:
        """Re-estimate every BatchNormalization's running mean/var on one pass over the training data.

        No augmentation (the statistics should describe the images the model will see) and no
        gradient; each statistic becomes the average over batches of the batch statistic, as
        ``torch.optim.swa_utils.update_bn`` computes it. Returns the samples seen (on this rank).
        """
        module, norms = self.module, self.norms
        if not module.stat_buffers and not norms:
            return 0
        iterable, _ = self._epoch_batches(train_batches)
        saved = module.training, module.batch_stats, module.bn_momentum
        module.train()
        module.batch_stats, module.bn_momentum = True, None
        module.reset_bn_average()
        if norms:
            channels = norms.teacher_channels(self.teacher_model, module.params)
            if channels:
                batches, _ = self._epoch_batches(train_batches)
                norms.set_targets(self._teacher_channel_stats(channels, batches))
            norms.collect_only = True
        seen = 0
        try:
            with torch.no_grad():
                for batch in iterable:
                    feeds = {k: as_tensor(v) for k, v in batch.feeds.items() if k in module.input_names}
                    module(**feeds)
                    seen += len(next(iter(feeds.values())))
        finally:
            module.train(saved[0])
            module.batch_stats, module.bn_momentum = saved[1], saved[2]
            if norms is not None:
                norms.collect_only = False
        if seen == 0:
            raise InputError("the training data produced no batches")
        self._sync_bn()
        if norms is not None:
            norms.reset_identity()
        return seen

    def _teacher_channel_stats(self, channels: dict[str, list[int]],
                               batches: Iterable[BatchLike]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Conv output name -> (mean, unbiased var) [C] of the teacher's ``channels`` of that output,
        averaged over batches like the student's re-estimated statistics (and over the ranks)."""
        probe = onnx.ModelProto()
        probe.CopyFrom(self.teacher_model)
        declared = {o.name for o in probe.graph.output}
        names = list(channels)
        probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in declared)
        session = _TeacherRunner(probe, names[0], self.teacher.threads).session
        inputs = [i.name for i in session.get_inputs()]
        sums = {n: [np.zeros(len(channels[n])), np.zeros(len(channels[n]))] for n in names}
        count = 0
        for batch in batches:
            for name, y in zip(names, session.run(names, {k: batch.feeds[k] for k in inputs})):
                y = y[:, channels[name]].astype(np.float64)
                axes = (0, *range(2, y.ndim))
                sums[name][0] += y.mean(axes)
                sums[name][1] += y.var(axes, ddof=1)
            count += 1
        parts = distributed.all_gather_object((sums, count))
        total = sum(p[1] for p in parts)
        if total == 0:
            raise InputError("the training data produced no batches")
        return {n: tuple(sum(p[0][n][i] for p in parts) / total for i in (0, 1)) for n in names}

    def _sync_bn(self) -> None:
        """Average the BatchNormalization running statistics over the ranks (no-op in one process)."""
        stats = [getattr(self.module, b) for b in self.module.stat_buffers]
        stats += self.norms.stats() if self.norms is not None else []
        if not self.world.distributed or not stats:
            return
        parts = distributed.all_gather_object(stats)
        with torch.no_grad():
            for i, buffer in enumerate(stats):
                buffer.copy_(torch.stack([p[i] for p in parts]).mean(0))

    def train_epoch(self, epoch: int, train_batches: Callable[[], Iterable[BatchLike]]) -> EpochRecord:
        s = self.settings
        started = time.perf_counter()
        iterable, per_epoch = self._epoch_batches(train_batches)
        if per_epoch and self.total_steps is None:
            self.total_steps = per_epoch * s.epochs
        self.model.train()
        self.module.batch_stats = s.bn == "train"
        self.module.bn_momentum = 0.1
        sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "agree": 0.0}
        seen = labelled = 0
        bar = tqdm(iterable, total=per_epoch, desc=f"distill {epoch}/{s.epochs}", unit="batch",
                   disable=not (s.progress and self.primary), dynamic_ncols=True)
        for batch in bar:
            if self.sample_feeds is None:
                self.sample_feeds = {k: np.array(v, copy=True) for k, v in batch.feeds.items()}
            threads = self.threads.current()
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            step_start = time.perf_counter()
            loss, kd, ce, agree, n = self.train_step(batch, epoch)
            self.threads.record((time.perf_counter() - step_start) / n)
            if self.threads.chosen is not None and self.teacher.threads != self.threads.chosen:
                self.teacher.set_threads(self.threads.chosen)
            self.step += 1
            seen += n
            sums["loss"] += loss * n
            sums["kd"] += kd * n
            sums["agree"] += agree * n
            if ce is not None:
                sums["ce"] += ce * n
                labelled += n
            bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", agree=f"{sums['agree'] / seen:.3f}", refresh=False)
        bar.close()
        self.module.batch_stats = False
        if s.bn == "train":
            self._sync_bn()
        if self.world.distributed:  # the report describes the whole epoch, not this rank's share
            parts = distributed.all_gather_object((sums, seen, labelled))
            sums = {k: sum(p[0][k] for p in parts) for k in sums}
            seen, labelled = sum(p[1] for p in parts), sum(p[2] for p in parts)
        if seen == 0:
            raise InputError("the training data produced no batches")
        if self.total_steps is None:  # length learnt from the first epoch; the cosine starts now
            self.total_steps = max(self.step * s.epochs, 1)
        return EpochRecord(
            epoch=epoch, loss=sums["loss"] / seen, kd_loss=sums["kd"] / seen,
            ce_loss=sums["ce"] / labelled if labelled else None, train_agreement=sums["agree"] / seen,
            eval_agreement=None, eval_accuracy=None, lr=self.optimizer.param_groups[0]["lr"],
            samples=seen, seconds=time.perf_counter() - started,
        )

    def train_step(self, batch: BatchLike, epoch: int) -> tuple[float, float, float | None, float, int]:
        """One optimiser step; returns (loss, kd, ce or None, agreement, batch size)."""
        s = self.settings
        feeds = {k: as_tensor(v) for k, v in batch.feeds.items()}
        if s.augment:
            feeds = {k: _augment(v, self.layouts.get(k), self.gen, s.hflip) for k, v in feeds.items()}
        t_logits = torch.from_numpy(self.teacher({k: v.numpy() for k, v in feeds.items()}))
        outputs = self.model(**{k: feeds[k] for k in self.module.input_names if k in feeds})
        s_logits = outputs[self.out_index] if isinstance(outputs, tuple) else outputs
        s2, t2 = _as_class_rows(s_logits), _as_class_rows(t_logits)
        if s2.shape != t2.shape:
            raise InputError(
                f"student logits {tuple(s_logits.shape)} and teacher logits {tuple(t_logits.shape)} differ"
            )
        T = s.temperature
        kd = F.kl_div(F.log_softmax(s2 / T, 1), F.log_softmax(t2.to(s2.dtype) / T, 1),
                      log_target=True, reduction="batchmean") * T**2
        loss, ce = kd, None
        if batch.labels is not None and s.alpha > 0:
            ce = F.cross_entropy(s_logits, torch.from_numpy(_labels(batch.labels, tuple(s_logits.shape))))
            loss = kd + s.alpha * ce
        if not torch.isfinite(loss):
            raise InputError(f"distillation diverged (loss {loss.item()}) in epoch {epoch}; lower the learning rate")
        if self.total_steps:
            progress = min(self.step, self.total_steps) / self.total_steps
            for group in self.optimizer.param_groups:
                group["lr"] = s.lr * 0.5 * (1 + math.cos(math.pi * progress))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, s.clip_grad_norm)
        self.optimizer.step()
        agree = float((s2.argmax(1) == t2.argmax(1)).float().mean())
        return loss.item(), kd.item(), None if ce is None else ce.item(), agree, int(s_logits.shape[0])

    def evaluate(self, batches: Iterable[BatchLike]) -> tuple[float, float | None, float | None]:
        """(agreement with the teacher, student top-1, teacher top-1); accuracies None without labels.

        The student runs in ONNX Runtime after a write-back: that is the model the user gets,
        and ORT suffers far less than torch from a CPU shared with other processes.
        """
        student = _TeacherRunner(write_back(self.module, self.student), self.teacher.output, self.teacher.threads)
        agree = correct = t_correct = seen = labelled = 0
        for batch in batches:
            s_logits = student(batch.feeds)
            s_pred, t_pred = s_logits.argmax(1), self.teacher(batch.feeds).argmax(1)
            agree += int((s_pred == t_pred).sum())
            seen += s_pred.size
            if batch.labels is not None:
                y = _labels(batch.labels, s_logits.shape)
                correct += int((s_pred == y).sum())
                t_correct += int((t_pred == y).sum())
                labelled += y.size
        if seen == 0:
            raise InputError("the evaluation data produced no batches")
        if labelled == 0:
            return agree / seen, None, None
        return agree / seen, correct / labelled, t_correct / labelled

    @staticmethod
    def _print_epoch(rec: EpochRecord) -> None:
        extra = "" if rec.eval_agreement is None else f", held-out agreement {rec.eval_agreement:.4f}"
        extra += "" if rec.eval_accuracy is None else f", accuracy {rec.eval_accuracy:.4f}"
        tqdm.write(f"epoch {rec.epoch}: loss {rec.loss:.4f}, train agreement {rec.train_agreement:.4f}{extra} "
                   f"({rec.seconds:.1f} s)")


class _ThreadChooser:
    """Times the first training steps with each candidate thread count and keeps the fastest.

    On a CPU shared with other processes, OpenMP threads waiting for each other can make a
    multi-threaded step far slower than a single-threaded one (ResNet-20, batch 64, on this
    2-core machine at load 6: 4.7 s with 2 threads against 0.28 s with 1); on an idle machine
    the extra threads win. Step 0 is a warm-up; then each candidate, fewest threads first, runs
    ``trials`` steps, cut short when its first step is over twice as slow as the best so far.
    """

    def __init__(self, candidates: list[int], trials: int = 2) -> None:
        self.queue = [min(candidates)] + [c for c in sorted(candidates) for _ in range(trials)]
        self.times: dict[int, list[float]] = {c: [] for c in candidates}
        self.chosen: int | None = candidates[0] if len(candidates) == 1 else None
        self.warm = False

    def current(self) -> int:
        """The thread count for the next step."""
        return self.chosen if self.chosen is not None else self.queue[0]

    def record(self, seconds_per_sample: float) -> None:
        """Time of the step just run with :meth:`current` threads."""
        if self.chosen is not None:
            return
        threads = self.queue.pop(0)
        if self.warm:
            self.times[threads].append(seconds_per_sample)
            best = min((float(np.median(t)) for c, t in self.times.items() if t and c != threads), default=None)
            if best is not None and seconds_per_sample > 2 * best:
                self.queue = [c for c in self.queue if c != threads]
        self.warm = True
        if not self.queue:
            self.chosen = min((c for c in self.times if self.times[c]), key=lambda c: float(np.median(self.times[c])))


class _TeacherRunner:
    """A frozen model (the teacher) in ONNX Runtime, returning one output as float32 numpy."""

    def __init__(self, teacher: onnx.ModelProto, output: str, threads: int) -> None:
        self.serialized = teacher.SerializeToString()
        self.set_threads(threads)
        names = [o.name for o in self.session.get_outputs()]
        self.output = output if output in names else names[0]
        self.inputs = [i.name for i in self.session.get_inputs()]

    def set_threads(self, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle ORT workers must not spin: the student's backward pass needs those cores next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(self.serialized, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"ONNX Runtime cannot load the teacher model: {str(exc).splitlines()[0]}") from None
        self.threads = threads

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise InputError(f"the data has no feed for the teacher's input(s) {', '.join(missing)}")
        return self.session.run([self.output], {n: feeds[n] for n in self.inputs})[0].astype(np.float32, copy=False)


def _output_index(names: list[str], output: str | None) -> int:
    if output is None:
        return 0
    if output not in names:
        raise InputError(f"the student has no output {output!r}; its outputs are {', '.join(names)}")
    return names.index(output)


def _ddp(module: OnnxModule) -> torch.nn.Module:
    """``module`` in DistributedDataParallel (CPU, the process group of :mod:`onnx_ocnna.distributed`)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # Buffers are the frozen BatchNorm statistics, identical everywhere: no sync per forward.
    # static_graph: the parameters reaching the loss never change, and some may not reach it at
    # all (a second output's head), which DDP otherwise rejects.
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    return DistributedDataParallel(module, static_graph=True, **{no_sync: False})


def _fingerprint(model: onnx.ModelProto) -> str:
    from onnx_ocnna.model_io import model_sha256

    return model_sha256(model)


def _copy_batch(batch: BatchLike) -> BatchLike:
    """A batch with its own arrays (a reader may refill the ones it returned)."""
    out = copy.copy(batch)
    out.feeds = {k: np.array(v, copy=True) for k, v in batch.feeds.items()}
    return out


def _length(obj: object) -> int | None:
    try:
        return len(obj) or None  # type: ignore[arg-type]
    except TypeError:
        return None


def _as_class_rows(logits: torch.Tensor) -> torch.Tensor:
    """[N, K] as is; [N, K, d1, ...] (dense prediction) as [N*d1*..., K]."""
    if logits.dim() < 2:
        raise InputError(f"the distilled output must have a class axis; its shape is {tuple(logits.shape)}")
    if logits.dim() == 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def _labels(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Checked int64 labels [N] for logits of ``shape`` [N, K]."""
    y = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
    if len(shape) != 2:
        raise InputError(f"labels need an output of shape [N, classes]; this one is {list(shape)}")
    if y.shape[0] != shape[0]:
        raise InputError(f"{y.shape[0]} labels for a batch of {shape[0]}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= shape[1]):
        raise InputError(f"labels must lie in 0..{shape[1] - 1} for a {shape[1]}-class output")
    return y


def _input_layouts(model: onnx.ModelProto) -> dict[str, str]:
    """Input name -> "NCHW" / "NHWC" for rank-4 inputs whose declared shape tells."""
    try:
        from onnx_ocnna.calibration import model_input_spec
    except ImportError:  # pragma: no cover - calibration is part of the package
        return {}
    return {spec.name: spec.layout for spec in model_input_spec(model) if spec.layout}


def _guess_layout(shape: tuple[int, ...]) -> str | None:
    """Layout of an [N, a, b, c] array: the channel axis is the small one (1, 3 or 4)."""
    small = (1, 3, 4)
    if shape[1] in small and shape[3] not in small:
        return "NCHW"
    if shape[3] in small and shape[1] not in small:
        return "NHWC"
    return None


def _augment(x: torch.Tensor, layout: str | None, gen: torch.Generator, hflip: bool) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip of an image batch.

    Args:
        x: [N, C, H, W] or [N, H, W, C]; other ranks and non-numeric inputs pass through.
    """
    if x.dim() != 4 or x.dtype == torch.bool:
        return x
    layout = layout or _guess_layout(tuple(x.shape))
    if layout is None:
        return x
    nhwc = x if layout == "NHWC" else x.permute(0, 2, 3, 1)
    n, h, w, _ = nhwc.shape
    pad = max(1, round(4 * min(h, w) / 32))
    padded = F.pad(nhwc, (0, 0, pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], rows, cols]  # [N, H, W, C]
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(2), out)
    out = out if layout == "NHWC" else out.permute(0, 3, 1, 2)
    return out.contiguous()
