"""Statistics ONNX Runtime computes inside the scoring graph, so a measured tensor need not be
returned whole.

Returning a feature map costs more than computing it: ONNX Runtime runs a Conv and its ReLU
in a blocked channel layout (NCHWc), and every map returned must be reordered to NCHW and
copied out (on ResNet-56, 55 maps add about a third to a plain pass), and then read again
by NumPy. A reduction appended to the graph reads the map where it lies, in the blocked
layout, and returns an array 1/H the size. An accumulator asks for one through
:meth:`onnx_ocnna.criteria.base.Accumulator.reduction`; :mod:`onnx_ocnna.collect` adds the
nodes and hands the reduced arrays to :meth:`~onnx_ocnna.criteria.base.Accumulator.update_reduced`.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper


@dataclass(frozen=True)
class ColumnMoments:
    """Per column of each H x W map, the mean and the mean square over its H rows.

    Two AveragePool nodes with a kernel of H x 1, one over the map and one over its square;
    both pools and the product stay in ONNX Runtime's blocked layout.

    Attributes:
        channels, height, width: C, H, W of the measured tensor [N, C, H, W] (static).

    Outputs (in :meth:`add_to`'s order): mean [N, C, 1, W] and mean square [N, C, 1, W],
    in the tensor's float type.
    """

    channels: int
    height: int
    width: int

    def output_dims(self) -> list[tuple[int, ...]]:
        """Each output's dims after the batch axis, in :meth:`add_to`'s order."""
        return [(self.channels, 1, self.width)] * 2

    def add_to(self, graph: onnx.GraphProto, tensor: str, prefix: str) -> list[str]:
        """Append the nodes reading ``tensor`` to ``graph``; returns the output names.

        ``prefix`` must be unused by the graph's tensor names.
        """
        mean, square, mean_square = f"{prefix}/column_mean", f"{prefix}/square", f"{prefix}/column_mean_square"
        kernel = [self.height, 1]
        graph.node.extend([
            helper.make_node("AveragePool", [tensor], [mean], name=f"{prefix}/mean_pool", kernel_shape=kernel),
            helper.make_node("Mul", [tensor, tensor], [square], name=f"{prefix}/square"),
            helper.make_node("AveragePool", [square], [mean_square], name=f"{prefix}/mean_square_pool",
                             kernel_shape=kernel),
        ])
        return [mean, mean_square]


Reduction = ColumnMoments
"""Every reduction an accumulator may ask for (one kind so far)."""
