"""A small builder for hand-made ONNX graphs in tests (onnx.helper with random weights)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    def __init__(self, seed: int = 0, opset: int = 13) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def const(self, values, name: str | None = None) -> str:
        name = name or self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, name: str | None = None, **attrs) -> list[str]:
        name = name or self.name(op.lower())
        outputs = [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, group: int = 1, name: str | None = None,
             bias: bool = True, stride: int = 1, pad: int | None = None) -> str:
        """A Conv with random weights; ``pad`` defaults to k // 2 ("same" at stride 1)."""
        name = name or self.name("conv")
        w = self.const(self.rng.standard_normal((c_out, c_in // group, k, k)).astype(np.float32) * 0.3, f"{name}.w")
        inputs = [x, w]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(c_out).astype(np.float32) * 0.1, f"{name}.b"))
        pad = k // 2 if pad is None else pad
        return self.node("Conv", inputs, name=name, pads=[pad] * 4, group=group, strides=[stride, stride])[0]

    def bn(self, x: str, c: int, name: str | None = None) -> str:
        name = name or self.name("bn")
        r = self.rng
        params = [
            self.const((r.random(c) + 0.5).astype(np.float32), f"{name}.scale"),
            self.const(r.standard_normal(c).astype(np.float32) * 0.1, f"{name}.bias"),
            self.const(r.standard_normal(c).astype(np.float32) * 0.1, f"{name}.mean"),
            self.const((r.random(c) + 0.5).astype(np.float32), f"{name}.var"),
        ]
        return self.node("BatchNormalization", [x] + params, name=name)[0]

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])[0]

    def gemm(self, x: str, k: int, n: int, name: str | None = None) -> str:
        name = name or self.name("fc")
        w = self.const(self.rng.standard_normal((n, k)).astype(np.float32) * 0.1, f"{name}.w")
        b = self.const(np.zeros(n, np.float32), f"{name}.b")
        return self.node("Gemm", [x, w, b], name=name, transB=1)[0]

    def model(self, x_shape, output: str, input_name: str = "x") -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test",
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        # IR 8 as before; opsets above 18 need the IR version that introduced them.
        model.ir_version = max(8, helper.find_min_ir_version_for(list(model.opset_import)))
        # Give the output the shape ONNX Runtime computes (the checker wants one).
        import onnxruntime as ort

        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        dims = [d if isinstance(d, int) else 1 for d in x_shape]
        result = session.run(None, {input_name: np.zeros(dims, np.float32)})[0]
        out_shape = list(result.shape)
        if not isinstance(x_shape[0], int):
            out_shape[0] = x_shape[0]
        model.graph.output[0].CopyFrom(helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape))
        onnx.checker.check_model(model)
        return model


def residual_net(zero_blocks: set[int], channels: int = 8, blocks: int = 3,
                 relu_after_add: bool = True) -> onnx.ModelProto:
    """Stem + ``blocks`` residual blocks (relu(x + conv(relu(conv(x))))) + a pad-free head, input
    [N, 3, 6, 6]; the blocks in ``zero_blocks`` have an all-zero last conv, so they compute
    exactly relu(x) = x. ``relu_after_add=False`` gives MobileNetV2's linear blocks (x +
    conv(relu(conv(x)))): one block's Add output is the next block's shortcut."""
    g = GraphBuilder(seed=1)
    x = g.relu(g.conv("x", 3, channels, name="stem"))
    for i in range(blocks):
        h = g.relu(g.conv(x, channels, channels, name=f"b{i}_c1"))
        r = g.conv(h, channels, channels, name=f"b{i}_c2")
        if i in zero_blocks:
            for init in g.inits:
                if init.name in (f"b{i}_c2.w", f"b{i}_c2.b"):
                    init.CopyFrom(numpy_helper.from_array(np.zeros(numpy_helper.to_array(init).shape, np.float32),
                                                          init.name))
        x = g.node("Add", [r, x], name=f"b{i}_add")[0]
        x = g.relu(x) if relu_after_add else x
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [x])[0]])[0], channels, 4)
    return g.model(["N", 3, 6, 6], out)
