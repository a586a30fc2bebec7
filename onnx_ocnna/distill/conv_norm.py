"""Training-time BatchNorm for Convs whose BatchNormalization the exporter folded away.

Distillation with ``bn="train"`` trains BatchNormalization layers with batch statistics. Many
exports have none left: the exporter folded each one into the preceding Conv's weight and bias.
:class:`ConvNorms` gives such a Conv a temporary per-channel normalisation of its output while
it trains, and folds it back when the values are written into the graph:

    z = gamma * (y - mean) / sqrt(var + eps) + beta,    y = Conv(x, W) + b    [N, C, ...]

with the batch's statistics in ``train()`` mode when :attr:`OnnxModule.batch_stats` is set (the
running ones then follow with the module's ``bn_momentum``) and the running statistics
otherwise. Once the statistics are estimated, :meth:`ConvNorms.reset_identity` sets
gamma = sqrt(var + eps) and beta = mean, so the eval-mode function is unchanged. Folding:
s = gamma / sqrt(var + eps), W' = W * s (per output channel), b' = (b - mean) * s + beta; the
graph keeps its nodes and initializers, only values change.

A Conv qualifies when its weight and bias are trainable initializers that no other node uses and
its output does not feed a BatchNormalization (which trains with batch statistics itself). A Conv
without a bias would need a new initializer to fold into and is left as it is.

Starting from the teacher's statistics: re-estimating a kept BatchNorm's statistics after pruning
repairs the network (each channel is normalised afresh and its scale and shift, learnt on the
original, restore the distribution the next layer expects). For a folded Conv the distiller can
do the same when the teacher has the same Conv (an output of the same name) and the student's
bias is an untrained pruned copy of the teacher's: :func:`kept_channels` finds which teacher
channels the student kept (the student's bias values in order, exactly, within the teacher's),
and the normalisation starts at gamma = sqrt(teacher var + eps), beta = teacher mean of those
channels, with the student's own statistics estimated in the same pass (``targets``).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from onnx_ocnna.distill.torch_graph import NodeContext, OnnxModule

Tensor = torch.Tensor


class ConvNorms(torch.nn.Module):
    """The temporary normalisations of one :class:`OnnxModule`, installed as output hooks.

    Attributes:
        convs: (Conv output name, weight initializer, bias initializer) per normalised Conv.
        gamma, beta: trainable [C] per Conv, keyed "n0", "n1", ... in ``convs`` order.
        collect_only: in batch-statistics mode, the normalisations without a teacher target
            update their running statistics but return the Conv output unchanged (estimating
            them without changing what later layers see).
        targets: norm key -> (teacher mean, teacher var) [C] set by :meth:`set_targets`.
    """

    def __init__(self, module: OnnxModule, model: onnx.ModelProto, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.collect_only = False
        self.targets: dict[str, tuple[Tensor, Tensor]] = {}
        self.gamma = torch.nn.ParameterDict()
        self.beta = torch.nn.ParameterDict()
        self.convs: list[tuple[str, str, str]] = []
        self._keys: list[tuple[str, str, str]] = []  # (norm key, weight param key, bias param key)
        graph = model.graph
        key_of = {init: key for key, init in module.param_names.items()}
        uses = Counter(name for node in graph.node for name in node.input if name)
        normalised = {node.input[0] for node in graph.node if node.op_type == "BatchNormalization"}
        for node in graph.node:
            if node.op_type != "Conv" or len(node.input) < 3 or node.output[0] in normalised:
                continue
            w, b = node.input[1], node.input[2]
            if w not in key_of or b not in key_of or uses[w] != 1 or uses[b] != 1:
                continue
            channels = module.params[key_of[b]].shape[0]
            dtype = module.params[key_of[b]].dtype
            key = f"n{len(self.convs)}"
            self.gamma[key] = torch.nn.Parameter(torch.full((channels,), math.sqrt(1 + eps), dtype=dtype))
            self.beta[key] = torch.nn.Parameter(torch.zeros(channels, dtype=dtype))
            self.register_buffer(f"mean_{key}", torch.zeros(channels, dtype=dtype))
            self.register_buffer(f"var_{key}", torch.ones(channels, dtype=dtype))
            self.convs.append((node.output[0], w, b))
            self._keys.append((key, key_of[w], key_of[b]))
            module.output_hooks[node.output[0]] = self._hook(key)

    def __len__(self) -> int:
        return len(self.convs)

    def stats(self) -> list[Tensor]:
        """The running-statistics buffers (for averaging over ranks)."""
        return [getattr(self, f"{kind}_{key}") for key, _, _ in self._keys for kind in ("mean", "var")]

    def _hook(self, key: str):
        def apply(ctx: NodeContext, y: Tensor) -> Tensor:
            mean, var = getattr(self, f"mean_{key}"), getattr(self, f"var_{key}")
            gamma, beta = self.gamma[key], self.beta[key]
            if not (ctx.training and ctx.batch_stats):
                return F.batch_norm(y, mean, var, gamma, beta, training=False, eps=self.eps)
            if self.collect_only and key not in self.targets:
                with torch.no_grad():
                    F.batch_norm(y.detach(), mean, var, None, None, training=True, momentum=ctx.bn_momentum,
                                 eps=self.eps)
                return y
            return F.batch_norm(y, mean, var, gamma, beta, training=True, momentum=ctx.bn_momentum, eps=self.eps)

        return apply

    def teacher_channels(self, teacher: onnx.ModelProto, params: torch.nn.ParameterDict) -> dict[str, list[int]]:
        """Conv output name -> the teacher channel of each student channel, for the Convs whose
        bias is an exact pruned copy of the teacher Conv's (same output name)."""
        inits = {t.name: t for t in teacher.graph.initializer}
        mine = {name: b_key for (name, _, _), (_, _, b_key) in zip(self.convs, self._keys)}
        out: dict[str, list[int]] = {}
        for node in teacher.graph.node:
            name = node.output[0] if node.output else ""
            if node.op_type != "Conv" or name not in mine or len(node.input) < 3 or node.input[2] not in inits:
                continue
            kept = kept_channels(params[mine[name]].detach().numpy(), numpy_helper.to_array(inits[node.input[2]]))
            if kept is not None:
                out[name] = kept
        return out

    @torch.no_grad()
    def set_targets(self, stats: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Start each named Conv's normalisation at the teacher's channel statistics.

        Args:
            stats: Conv output name -> (mean, var) [C] of the teacher's matching channels.
        """
        for (name, _, _), (key, _, _) in zip(self.convs, self._keys):
            if name in stats:
                mean, var = (torch.as_tensor(v, dtype=self.beta[key].dtype) for v in stats[name])
                self.targets[key] = (mean, var)
                self.gamma[key].copy_(torch.sqrt(var + self.eps))
                self.beta[key].copy_(mean)

    @torch.no_grad()
    def reset_identity(self) -> None:
        """gamma = sqrt(var + eps), beta = mean for the Convs without a teacher target: their
        eval-mode normalisation is the identity."""
        for key, _, _ in self._keys:
            if key not in self.targets:
                self.gamma[key].copy_(torch.sqrt(getattr(self, f"var_{key}") + self.eps))
                self.beta[key].copy_(getattr(self, f"mean_{key}"))

    @torch.no_grad()
    def folded(self, params: torch.nn.ParameterDict) -> dict[str, Tensor]:
        """Initializer name -> folded value, for every normalised Conv's weight and bias.

        Args:
            params: the module's parameters (the trained W [C, ...] and b [C]).
        """
        out: dict[str, Tensor] = {}
        for (_, w_name, b_name), (key, w_key, b_key) in zip(self.convs, self._keys):
            mean, var = getattr(self, f"mean_{key}"), getattr(self, f"var_{key}")
            scale = self.gamma[key] / torch.sqrt(var + self.eps)
            w = params[w_key].detach()
            out[w_name] = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
            out[b_name] = (params[b_key].detach() - mean) * scale + self.beta[key]
        return out


def kept_channels(student_bias: np.ndarray, teacher_bias: np.ndarray) -> list[int] | None:
    """Indices j_0 < j_1 < ... with teacher_bias[j_i] == student_bias[i] exactly, or None.

    Greedy: the first equal value in order. Equal biases of two teacher channels could be
    confused; a folded Conv's bias (beta - mean * scale) practically never repeats a value.
    """
    if student_bias.ndim != 1 or student_bias.shape[0] > teacher_bias.shape[0]:
        return None
    kept, j = [], 0
    for value in student_bias:
        while j < len(teacher_bias) and teacher_bias[j] != value:
            j += 1
        if j == len(teacher_bias):
            return None
        kept.append(j)
        j += 1
    return kept
