"""Knowledge distillation of pruned ONNX graphs in PyTorch (SPEC section 7).

``torch_graph``: ONNX -> ``torch.nn.Module`` interpreter (its handlers in ``torch_ops/``);
``writeback``: trained values back into the graph's initializers plus the ONNX Runtime
agreement check; ``train``: the KD loop, with ``records`` (settings and report),
``batchnorm`` (statistics re-estimation), ``checkpoint``, ``augment`` and ``runtime``
(threads, teacher session, DDP); ``conv_norm``: training-time BatchNorm for Convs whose
BatchNorm the exporter folded.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # torch is an optional dependency (pip install onnx-ocnna[torch])
    from onnx_ocnna.errors import InputError

    raise InputError("distillation needs PyTorch; install it with: pip install 'onnx-ocnna[torch]'") from exc

from onnx_ocnna.distill.torch_graph import OPS, OnnxModule
from onnx_ocnna.distill.train import DistillReport, EpochRecord, distill
from onnx_ocnna.distill.writeback import check_agreement, write_back

__all__ = ["OPS", "OnnxModule", "DistillReport", "EpochRecord", "distill", "check_agreement", "write_back"]
