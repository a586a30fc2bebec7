"""Knowledge distillation of a pruned ONNX graph from its original (SPEC section 7).

The student is the pruned graph run by :class:`~onnx_ocnna.distill.torch_graph.OnnxModule`
with its initializers as parameters; the teacher is the original model. The trained values
are written back into the student's own initializers and ONNX Runtime must agree with
PyTorch before the model is returned. This module is the loop; BatchNorm handling,
checkpoints, augmentation and the runtime (threads, teacher session, DDP) have their own.

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
* **BatchNormalization** (``bn``: ``"frozen"``, ``"recompute"``, ``"train"``, the default):
  :mod:`~onnx_ocnna.distill.batchnorm`.
* **Augmentation** (4D image inputs, ``augment=True``): random crop and horizontal flip,
  :mod:`~onnx_ocnna.distill.augment`; the teacher sees the same augmented images.
* **Threads**, the teacher's ORT session and the DDP wrapper: :mod:`~onnx_ocnna.distill.runtime`.
* **Evaluation** (``eval_batches``) runs the written-back student in ONNX Runtime: the
  numbers describe the file the user gets.
* **Several processes** (under torchrun, :mod:`onnx_ocnna.distributed`): the student is wrapped
  in ``DistributedDataParallel`` (gradients averaged over the ranks, so one step sees W batches
  at the same learning rate and an epoch has ceil(K / W) steps instead of K); the K batches are
  dealt out as ``DistributedSampler(shuffle=False)`` would, at batch granularity
  (:func:`~onnx_ocnna.distributed.strided`). Each rank runs the teacher on its own batches; rank 0
  alone evaluates and writes checkpoints, and every rank returns the same model and report.
* **Random streams** (augmentation, dropout): rank 0 uses ``seed`` as a single process does,
  the other ranks seeds derived from (seed, rank), so they draw different crops.
* **Checkpoints** (``checkpoint_dir``, ``resume``): :mod:`~onnx_ocnna.distill.checkpoint`.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from onnx_ocnna import distributed
from onnx_ocnna.distill import batchnorm, checkpoint
from onnx_ocnna.distill.augment import augment, input_layouts
from onnx_ocnna.distill.checkpoint import CHECKPOINT_NAME
from onnx_ocnna.distill.conv_norm import ConvNorms
from onnx_ocnna.distill.records import BN_MODES, BatchLike, DistillReport, DistillSettings, EpochRecord
from onnx_ocnna.distill.runtime import TeacherRunner, ThreadChooser, available_cpus, ddp
from onnx_ocnna.distill.torch_graph import OnnxModule, as_tensor
from onnx_ocnna.distill.writeback import check_agreement, write_back
from onnx_ocnna.errors import InputError
from onnx_ocnna.evaluate import labels_outside
from onnx_ocnna.logits import logits_view, with_values_of

__all__ = ["BN_MODES", "CHECKPOINT_NAME", "BatchLike", "DistillReport", "DistillSettings", "EpochRecord",
           "available_cpus", "distill"]


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
            BatchNorm was folded away); see :mod:`~onnx_ocnna.distill.batchnorm`.
        temperature, alpha: the loss T^2 * KL + alpha * CE (CE only for labelled batches).
        augment, hflip: random crop (and horizontal flip) of 4D image inputs.
        eval_batches: held-out data, evaluated before training and after every epoch.
        steps_per_epoch: batches per epoch, if ``len()`` of the data cannot tell.
        output: name of the logits output [N, K] (or [N, K, ...]); default the first output, or
            the input of the Softmax that computes it (:mod:`onnx_ocnna.logits`: the student and
            teacher train and teach through views without it, and the values trained are
            written into ``student``).
        threads: CPU threads for torch and the teacher; None = choose (see :mod:`~onnx_ocnna.distill.runtime`).
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
    # A Keras-style final Softmax: probabilities at T = 4 are near uniform and teach next to nothing.
    student_view, teacher_view = (student, teacher) if output else (logits_view(student), logits_view(teacher))
    saved_threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            distilled, report = _Distiller(student_view, teacher_view, settings).run(
                train_batches, eval_batches, epoch_callback)
    finally:
        torch.set_num_threads(saved_threads)
    if student_view is not student:
        report.settings["logits"] = student_view.graph.output[0].name
        distilled = with_values_of(student, distilled)
    return distilled, report


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
        self.threads = ThreadChooser(candidates)
        self.teacher = TeacherRunner(teacher, self.module.output_names[self.out_index], candidates[0])
        self.layouts = input_layouts(student)
        rank_seed = settings.seed if self.primary else int(
            np.random.SeedSequence([settings.seed, self.world.rank]).generate_state(1)[0])
        self.gen = torch.Generator().manual_seed(rank_seed)
        if not self.primary:
            torch.manual_seed(rank_seed)  # dropout; distill() restores the caller's state
        self.params, self.optimizer = self._optimizer()
        self.total_steps: int | None = None
        self.step = 0
        self.sample_feeds: dict[str, np.ndarray] | None = None

    def _optimizer(self) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
        """The trained parameters (weight decay on those with two or more dimensions only) and their optimiser."""
        s = self.settings
        decay = [p for p in self.module.params.values() if p.dim() > 1]
        no_decay = [p for p in self.module.params.values() if p.dim() <= 1]
        if self.norms is not None:
            no_decay += list(self.norms.parameters())
        params = decay + no_decay
        if not params:
            raise InputError("the student has no float initializers to train")
        groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if s.optimizer == "sgd":
            return params, torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, nesterov=s.momentum > 0)
        return params, torch.optim.AdamW(groups, lr=s.lr)

    def run(
        self, train_batches: Callable[[], Iterable[BatchLike]], eval_batches: Callable[[], Iterable[BatchLike]] | None,
        epoch_callback: Callable[[EpochRecord], None] | None = None,
    ) -> tuple[onnx.ModelProto, DistillReport]:
        """Resume or start, repair BatchNorm, train every epoch, write back and check: the whole run."""
        started = time.perf_counter()
        s = self.settings
        report = DistillReport(settings={**asdict(s), "schedule": "cosine", "teacher": "onnxruntime",
                                         "processes": self.world.size,
                                         "bn_layers": len(self.module.stat_buffers) // 2,
                                         "conv_norms": len(self.norms or ())})
        first = 1
        if s.checkpoint_dir is not None:
            self.fingerprint = checkpoint.fingerprint(self.student)
            if s.resume:
                first = checkpoint.restore(self, report)
        torch.set_num_threads(self.threads.current())
        if self.world.distributed:
            self.model = ddp(self.module)
        if first == 1:
            self._before_training(report, train_batches, eval_batches)
        for epoch in range(first, s.epochs + 1):
            rec = self._epoch(epoch, report, train_batches, eval_batches)
            if epoch_callback is not None:
                epoch_callback(rec)
        distilled = self._write_back(report, train_batches)
        report.settings["threads"] = self.threads.current()
        # A run repeats bit for bit only at a fixed count (sums differ between counts).
        report.settings["threads_from"] = ("given" if self.settings.threads else
                                           "rank share" if self.world.distributed else "timed")
        report.seconds = time.perf_counter() - started
        return distilled, distributed.broadcast_object(report)

    def _before_training(self, report: DistillReport, train_batches: Callable[[], Iterable[BatchLike]],
                         eval_batches: Callable[[], Iterable[BatchLike]] | None) -> None:
        """Evaluate the pruned student, then re-estimate its BatchNorm statistics (unless frozen)."""
        s = self.settings
        if eval_batches is not None and self.primary:
            report.initial_agreement, report.initial_accuracy, report.teacher_accuracy = self.evaluate(eval_batches())
        if s.bn != "frozen":
            report.bn_recomputed_samples = self.recompute_bn(train_batches)
            report.settings["conv_norms_from_teacher"] = len(self.norms.targets) if self.norms else 0
            if report.bn_recomputed_samples and eval_batches is not None and self.primary:
                report.bn_recomputed_agreement, report.bn_recomputed_accuracy, _ = self.evaluate(eval_batches())

    def _epoch(self, epoch: int, report: DistillReport, train_batches: Callable[[], Iterable[BatchLike]],
               eval_batches: Callable[[], Iterable[BatchLike]] | None) -> EpochRecord:
        """Train one epoch, evaluate, print and checkpoint it; returns its record (also in ``report``)."""
        s = self.settings
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
            checkpoint.save(self, epoch, report)
        return rec

    def _write_back(self, report: DistillReport, train_batches: Callable[[], Iterable[BatchLike]]) -> onnx.ModelProto:
        """The trained values in the student's graph, checked against PyTorch by ONNX Runtime (rank 0)."""
        self.module.eval()
        distilled = write_back(self.module, self.student)
        if self.primary:
            if self.sample_feeds is None:  # resumed after the last epoch: nothing was trained here
                self.sample_feeds = next(iter(train_batches())).feeds
            report.check_max_diff = check_agreement(distilled, self.module, self.sample_feeds)
        return distilled


    # -- training --------------------------------------------------------------------------------

    def epoch_batches(
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
        """Re-estimate the BatchNorm running statistics (:func:`~onnx_ocnna.distill.batchnorm.recompute`)."""
        return batchnorm.recompute(self, train_batches)

    def train_epoch(self, epoch: int, train_batches: Callable[[], Iterable[BatchLike]]) -> EpochRecord:
        s = self.settings
        started = time.perf_counter()
        iterable, per_epoch = self.epoch_batches(train_batches)
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
            batchnorm.sync(self)
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
        feeds = self._augmented(batch)
        t_logits = torch.from_numpy(self.teacher({k: v.numpy() for k, v in feeds.items()}))
        outputs = self.model(**{k: feeds[k] for k in self.module.input_names if k in feeds})
        s_logits = outputs[self.out_index] if isinstance(outputs, tuple) else outputs
        loss, kd, ce, agree = self._loss(s_logits, t_logits, batch.labels, epoch)
        self._set_lr()
        self._optimise(loss)
        return loss.item(), kd.item(), None if ce is None else ce.item(), agree, int(s_logits.shape[0])

    def _augmented(self, batch: BatchLike) -> dict[str, torch.Tensor]:
        """The batch's feeds as tensors, augmented when the settings say so (teacher and student see the same)."""
        s = self.settings
        feeds = {k: as_tensor(v) for k, v in batch.feeds.items()}
        if s.augment:
            feeds = {k: augment(v, self.layouts.get(k), self.gen, s.hflip) for k, v in feeds.items()}
        return feeds

    def _loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: np.ndarray | None,
              epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
        """(T^2 * KL + alpha * CE, the KD term, CE or None, top-1 agreement) of logits [N, K] (or [N, K, ...])."""
        s = self.settings
        s2, t2 = _as_class_rows(s_logits), _as_class_rows(t_logits)
        if s2.shape != t2.shape:
            raise InputError(
                f"student logits {tuple(s_logits.shape)} and teacher logits {tuple(t_logits.shape)} differ"
            )
        T = s.temperature
        kd = F.kl_div(F.log_softmax(s2 / T, 1), F.log_softmax(t2.to(s2.dtype) / T, 1),
                      log_target=True, reduction="batchmean") * T**2
        loss, ce = kd, None
        if labels is not None and s.alpha > 0:
            ce = F.cross_entropy(s_logits, torch.from_numpy(_labels(labels, tuple(s_logits.shape))))
            loss = kd + s.alpha * ce
        if not torch.isfinite(loss):
            raise InputError(f"distillation diverged (loss {loss.item()}) in epoch {epoch}; lower the learning rate")
        agree = float((s2.argmax(1) == t2.argmax(1)).float().mean())
        return loss, kd, ce, agree

    def _set_lr(self) -> None:
        """The cosine schedule: the rate falls from ``lr`` to 0 over all steps (once their number is known)."""
        if self.total_steps:
            progress = min(self.step, self.total_steps) / self.total_steps
            for group in self.optimizer.param_groups:
                group["lr"] = self.settings.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def _optimise(self, loss: torch.Tensor) -> None:
        """Backward pass, gradient clipping and one optimiser step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.clip_grad_norm)
        self.optimizer.step()

    def evaluate(self, batches: Iterable[BatchLike]) -> tuple[float, float | None, float | None]:
        """(agreement with the teacher, student top-1, teacher top-1); accuracies None without labels.

        The student runs in ONNX Runtime after a write-back: that is the model the user gets,
        and ORT suffers far less than torch from a CPU shared with other processes.
        """
        student = TeacherRunner(write_back(self.module, self.student), self.teacher.output, self.teacher.threads)
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


def _output_index(names: list[str], output: str | None) -> int:
    if output is None:
        return 0
    if output not in names:
        raise InputError(f"the student has no output {output!r}; its outputs are {', '.join(names)}")
    return names.index(output)



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
    outside = labels_outside(y, shape[1])
    if outside:
        raise InputError(outside)
    return y
