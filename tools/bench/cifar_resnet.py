"""The CIFAR ResNets of ../shared/data/models rebuilt in PyTorch, with weights from the ONNX file.

The architecture is pytorch_resnet_cifar10's (He et al. 2016, 6n+2 layers, "option A" shortcuts:
stride-2 subsampling plus zero channels padded on both sides). Torch-Pruning needs a real module
tree to trace, which the project's ONNX interpreter (an op-by-op loop) is not.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn


class PadShortcut(nn.Module):
    """Option-A shortcut: x[:, :, ::2, ::2] with ``pad`` zero channels before and after."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, bn: bool) -> None:
        super().__init__()
        # A BN-folded export carries each BN in its Conv's bias, so those convs get a bias instead.
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(planes) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(planes) if bn else nn.Identity()
        self.shortcut = PadShortcut(planes // 4) if stride != 1 or cin != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2): images [N, 3, 32, 32] -> logits [N, classes]."""

    def __init__(self, blocks: int, bn: bool, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(16) if bn else nn.Identity()
        layers, cin = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for i in range(blocks):
                stage.append(BasicBlock(cin, planes, stride if i == 0 else 1, bn))
                cin = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))

    def block_internal_only(self) -> list[nn.Module]:
        """Layers whose outputs meet at residual Adds (plus the classifier): ignoring them leaves
        only the blocks' inner channels (conv1 -> conv2) prunable."""
        blocks = [b for stage in (self.layer1, self.layer2, self.layer3) for b in stage]
        return [self.conv1, self.linear] + [b.conv2 for b in blocks]


def _scope(node_name: str) -> str:
    """'/layer1/layer1.0/conv1/Conv' -> 'layer1.0.conv1'; '/conv1/Conv' -> 'conv1'."""
    parts = [p for p in node_name.split("/") if p][:-1]
    # Nested scopes repeat their parent's prefix ('layer1', 'layer1.0'): keep the innermost.
    keep = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
    return ".".join(keep)


def from_onnx(model: onnx.ModelProto) -> CifarResNet:
    """Rebuild the network of a TorchScript-exported CIFAR ResNet (BN folded or kept) with its weights."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    if (convs - 1) % 6:
        raise ValueError(f"{convs} Conv nodes is not a 6n+2 CIFAR ResNet")
    net = CifarResNet((convs - 1) // 6, bn)
    state: dict[str, torch.Tensor] = {}
    for node in model.graph.node:
        path = _scope(node.name)
        if node.op_type == "BatchNormalization":
            for key, name in zip(("weight", "bias", "running_mean", "running_var"), node.input[1:5]):
                state[f"{path}.{key}"] = torch.from_numpy(np.array(inits[name]))
        elif node.op_type in ("Conv", "Gemm"):
            state[f"{path}.weight"] = torch.from_numpy(np.array(inits[node.input[1]]))
            if len(node.input) > 2 and node.input[2]:
                state[f"{path}.bias"] = torch.from_numpy(np.array(inits[node.input[2]]))
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"weights do not match the rebuilt network: missing {missing}, unexpected {unexpected}")
    return net.eval()


def parameter_count(net: nn.Module) -> int:
    """Float elements of the state dict: what the ONNX export's initializers hold (BN stats included)."""
    return sum(v.numel() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked"))
