"""Benchmark: pruning the hidden fully connected layers of a Keras-style CIFAR-10 CNN (issue 13).

The model (trained here, so nothing is borrowed): Conv 32-32, MaxPool, Conv 64-64, MaxPool (3x3,
"same", ReLU, Dropout 0.25 after each pool), Keras' NHWC Flatten (Transpose + Reshape), Dense 512,
Dense 256 (ReLU, Dropout 0.5) and Dense 10. Every Dense is exported as tf2onnx writes it, MatMul by
a [K, N] weight then Add of the bias (the torch exporter; tf2onnx is not installed here). The FC
layers hold about 97 % of the parameters, so no conv-only cut reaches half of them.

Runs, each from the trained model, written to ``--out`` after every row:
  * ``all``: ``--target-params 0.5`` over every group (default criterion ocnna, measured
    allocation, reconstruction), then ``--distill`` (``--kd-epochs`` x ``--kd-images`` training
    images, no labels); the parameter saving split into FC and conv layers;
  * ``fc-only`` / ``conv-only``: the same budget with the conv / FC groups excluded (the conv-only
    budget is expected out of reach: the row records the error and the narrowest conv cut);
  * ``csi``: ``--fc-width csi`` alone (convs untouched): each hidden layer's CSI width against its
    original width, the CSI curve, held-out top-1 after reconstruction and after distillation.

Data (../shared/data/cifar10, class-balanced, decoded once into $OCNNA_BENCH_CACHE): ``--train-images``
training images (seed 0, shuffled) train the CNN; the first ``--kd-images`` of them are the
distillation data (labels dropped), the first ``--calib-images`` the labelled calibration data;
``--test-images`` test images (seed 1) are held out for every figure.

    python tools/bench_fc.py --out docs/results/fc_keras_cnn.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.arrays import ArraySource  # noqa: E402
from bench.common import cifar_subset, load_arrays, top1_of_source, write_json  # noqa: E402

from onnx_ocnna import api  # noqa: E402

CACHE = Path(os.environ.get("OCNNA_BENCH_CACHE", "/tmp/ocnna_bench_cache"))


class Dense(nn.Module):
    """Keras' Dense as tf2onnx exports it: x @ W + b, W [K, N] (MatMul, then Add)."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, n))
        self.bias = nn.Parameter(torch.zeros(n))
        nn.init.xavier_uniform_(self.weight)  # Keras' glorot_uniform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class KerasCifarCnn(nn.Module):
    """The Keras CIFAR-10 example CNN with two hidden Dense layers; input [N, 3, 32, 32]."""

    def __init__(self, hidden: tuple[int, int] = (512, 256)) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]

        self.features = nn.Sequential(*conv(3, 32), *conv(32, 32), nn.MaxPool2d(2), nn.Dropout(0.25),
                                      *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2), nn.Dropout(0.25))
        self.fc1, self.fc2, self.head = Dense(64 * 8 * 8, hidden[0]), Dense(hidden[0], hidden[1]), Dense(hidden[1], 10)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).permute(0, 2, 3, 1).reshape(-1, 64 * 8 * 8)  # Keras flattens NHWC
        x = self.drop(torch.relu(self.fc1(x)))
        x = self.drop(torch.relu(self.fc2(x)))
        return self.head(x)


def train(x: np.ndarray, y: np.ndarray, epochs: int, seed: int, log) -> tuple[KerasCifarCnn, list[dict]]:
    """Adam (1e-3, cosine), batch 128, random crop (pad 4) and horizontal flip."""
    torch.manual_seed(seed)
    model = KerasCifarCnn()
    steps = epochs * math.ceil(len(x) / 128)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(epochs):
        model.train()
        started, total, correct, seen = time.perf_counter(), 0.0, 0, 0
        order = rng.permutation(len(x))
        for start in range(0, len(x), 128):
            idx = order[start:start + 128]
            xb = torch.from_numpy(_augment(x[idx], rng))
            yb = torch.from_numpy(y[idx]).long()
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        row = {"epoch": epoch + 1, "loss": total / seen, "train_top1": correct / seen,
               "seconds": time.perf_counter() - started}
        history.append(row)
        log(f"  train epoch {epoch + 1}/{epochs}: loss {row['loss']:.3f}, train top-1 {row['train_top1']:.3f} "
            f"({row['seconds']:.0f} s)")
    return model.eval(), history


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    out = np.empty_like(x)
    for i, (dy, dx, flip) in enumerate(zip(rng.integers(0, 9, len(x)), rng.integers(0, 9, len(x)),
                                           rng.random(len(x)) < 0.5)):
        crop = padded[i, :, dy:dy + 32, dx:dx + 32]
        out[i] = crop[:, :, ::-1] if flip else crop
    return out


def export(model: nn.Module, path: Path) -> onnx.ModelProto:
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), str(path), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return onnx.load(str(path))


def params_by_kind(model: onnx.ModelProto) -> dict[str, int]:
    """Parameters of the Conv layers (weight, bias) and of the FC layers (MatMul weight and the
    bias Add after it), from the graph's initializers."""
    inits = {i.name: math.prod(i.dims) for i in model.graph.initializer}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    out = {"conv": 0, "fc": 0}
    for node in model.graph.node:
        if node.op_type == "Conv":
            out["conv"] += sum(inits.get(n, 0) for n in node.input[1:])
        elif node.op_type in ("MatMul", "Gemm"):
            out["fc"] += sum(inits.get(n, 0) for n in node.input[1:])
            after = readers.get(node.output[0], [])
            if len(after) == 1 and after[0].op_type == "Add":
                out["fc"] += sum(inits.get(n, 0) for n in after[0].input)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/fc_keras_cnn.json"))
    parser.add_argument("--runs", default="all,fc-only,conv-only,csi", help="comma-separated, in this order")
    parser.add_argument("--train-images", type=int, default=25000)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the CNN")
    parser.add_argument("--test-images", type=int, default=5000)
    parser.add_argument("--calib-images", type=int, default=1000)
    parser.add_argument("--kd-images", type=int, default=10000)
    parser.add_argument("--kd-epochs", type=int, default=3)
    parser.add_argument("--target-params", type=float, default=0.5)
    parser.add_argument("--csi-tolerance", type=float, default=0.01)
    parser.add_argument("--no-distill", default="conv-only", help="runs not distilled (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {text}", flush=True)

    result = {"benchmark": "tools/bench_fc.py", "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "rows": []}
    train_data = load_arrays(cifar_subset("train", args.train_images, args.seed, CACHE, shuffle=True))
    test_data = load_arrays(cifar_subset("test", args.test_images, 1, CACHE))
    x, y = train_data["input"], train_data["labels"].astype(np.int64)
    test = ArraySource("input", test_data["input"], test_data["labels"].astype(np.int64), 250)
    calib = ArraySource("input", x[:args.calib_images], y[:args.calib_images], 100)
    kd_data = ArraySource("input", x[:args.kd_images], None, 64, shuffle=True, seed=args.seed)  # no labels
    log(f"data: {len(x)} training, {len(test.x)} test images")

    teacher_path = CACHE / f"keras_cifar_cnn_{args.train_images}_{args.epochs}ep_seed{args.seed}.onnx"
    if teacher_path.exists():
        teacher = onnx.load(str(teacher_path))
        result["training"] = json.loads(teacher_path.with_suffix(".json").read_text())
        log(f"trained model from {teacher_path}")
    else:
        net, history = train(x, y, args.epochs, args.seed, log)
        teacher = export(net, teacher_path)
        result["training"] = {"epochs": args.epochs, "images": len(x), "history": history}
        teacher_path.with_suffix(".json").write_text(json.dumps(result["training"]))
    base, base_pred = top1_of_source(teacher, test)
    kinds = params_by_kind(teacher)
    result["original"] = {**base, "parameters": sum(kinds.values()), **{f"{k}_parameters": v for k, v in kinds.items()}}
    log(f"original: top-1 {base['top1']:.4f}; parameters conv {kinds['conv']:,}, fc {kinds['fc']:,} "
        f"({kinds['fc'] / sum(kinds.values()):.1%} in FC)")
    write_json(args.out, result)

    analysis = api.Pruner(teacher).analysis
    nodes = {n.name: n.op for n in analysis.graph.nodes}
    fc_members = [m for g in analysis.groups for m in g.members if nodes[m] in ("Gemm", "MatMul")]
    conv_members = [m for g in analysis.groups for m in g.members if nodes[m] == "Conv"]
    settings = {
        "all": {"target_params": args.target_params},
        "fc-only": {"target_params": args.target_params, "exclude": conv_members},
        "conv-only": {"target_params": args.target_params, "exclude": fc_members},
        "csi": {"percentile": 0.0, "fc_width": "csi", "csi_tolerance": args.csi_tolerance},
    }
    no_distill = set(filter(None, args.no_distill.split(",")))
    for run in filter(None, args.runs.split(",")):
        row = {"run": run, "settings": {k: v for k, v in settings[run].items() if k != "exclude"},
               "excluded": settings[run].get("exclude", [])}
        t0 = time.perf_counter()
        try:
            pruned, report = api.compress(teacher, calib, progress=False, **settings[run])
        except Exception as exc:  # noqa: BLE001 - an unreachable budget is a result here
            row["error"] = str(exc).splitlines()[0]
            log(f"{run}: {row['error']}")
            if run == "conv-only":  # the narrowest conv cut the allocation can make instead
                pruned, report = api.compress(teacher, calib, progress=False, percentile=99.9,
                                              exclude=fc_members, reconstruct=True)
                row["narrowest"] = "percentile 99.9 on the conv groups (one channel each)"
            else:
                result["rows"].append(row)
                write_json(args.out, result)
                continue
        after = params_by_kind(pruned)
        acc, _ = top1_of_source(pruned, test, base_pred)
        row.update(seconds=time.perf_counter() - t0, rpr=report.rpr, macs_ratio=report.macs_ratio,
                   parameters=report.after.parameters,
                   saved={k: kinds[k] - after[k] for k in kinds}, remaining={k: after[k] for k in kinds},
                   widths=report.extra.get("widths"), top1_compressed=acc["top1"], agreement_compressed=acc["agreement"],
                   drop_compressed=100 * (base["top1"] - acc["top1"]), timings=report.timings, notes=report.notes)
        stages = {s["stage"]: s["top1"] for s in (report.accuracy or {}).get("stages", [])}
        row["top1_stages"] = stages or None
        if report.extra.get("fc_width"):
            row["fc_width"] = [{k: v for k, v in w.items() if k != "order"} for w in report.extra["fc_width"]]
        saved = sum(row["saved"].values()) or 1
        log(f"{run}: RPR {report.rpr:.3f}, saved conv {row['saved']['conv']:,} / fc {row['saved']['fc']:,} "
            f"({row['saved']['fc'] / saved:.1%} of the saving in FC), top-1 {acc['top1']:.4f} "
            f"(drop {row['drop_compressed']:.2f} pt) in {row['seconds']:.0f} s")
        for w in row.get("fc_width", []):
            log(f"  CSI width {w['layer']}: {w['kept']} of {w['channels']} (CSI {w['csi_kept']:.4f} / {w['csi_full']:.4f})")
        if run not in no_distill:
            t0 = time.perf_counter()
            distilled, kd = api.distill(pruned, teacher, kd_data, epochs=args.kd_epochs, progress=False,
                                        seed=args.seed)
            kd_acc, _ = top1_of_source(distilled, test, base_pred)
            row.update(top1_distilled=kd_acc["top1"], agreement_distilled=kd_acc["agreement"],
                       drop_distilled=100 * (base["top1"] - kd_acc["top1"]), kd_seconds=time.perf_counter() - t0,
                       kd={"epochs": args.kd_epochs, "images": len(kd_data.x), "labels": False,
                           "losses": [e.loss for e in kd.epochs]})
            log(f"  distilled {args.kd_epochs} x {len(kd_data.x)} images, no labels: top-1 {kd_acc['top1']:.4f} "
                f"(drop {row['drop_distilled']:.2f} pt) in {row['kd_seconds']:.0f} s")
        result["rows"].append(row)
        write_json(args.out, result)
    result["seconds"] = time.perf_counter() - started
    write_json(args.out, result)


if __name__ == "__main__":
    main()
