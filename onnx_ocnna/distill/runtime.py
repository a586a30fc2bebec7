"""Where a distillation runs: the CPU thread count, the teacher in ONNX Runtime and the DDP wrapper under torchrun.

* **Threads**: at most the CPUs this process may use; with ``threads=None`` the first steps
  are timed with 1 and with all of them and the faster count is kept (:class:`ThreadChooser`).
  Under torchrun, without a thread count, each rank uses its share of the node's CPUs.
* **Teacher in ONNX Runtime** (:class:`TeacherRunner`), not PyTorch: it is frozen, so it needs
  no autograd, and ORT runs it about 3x faster than eager PyTorch on CPU (see
  :mod:`~onnx_ocnna.distill.train`). The same runner evaluates the written-back student.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import torch

from onnx_ocnna.distill.torch_graph import OnnxModule
from onnx_ocnna.errors import InputError


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ThreadChooser:
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


class TeacherRunner:
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


def ddp(module: OnnxModule) -> torch.nn.Module:
    """``module`` in DistributedDataParallel (CPU, the process group of :mod:`onnx_ocnna.distributed`)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # Buffers are the frozen BatchNorm statistics, identical everywhere: no sync per forward.
    # static_graph: the parameters reaching the loss never change, and some may not reach it at
    # all (a second output's head), which DDP otherwise rejects.
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    return DistributedDataParallel(module, static_graph=True, **{no_sync: False})
