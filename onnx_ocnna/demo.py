"""`onnx-ocnna demo`: the whole pipeline on the small digits CNN that ships in the package.

The model (tools/make_digits_model.py) was trained on scikit-learn's bundled 8x8 digits with a
fixed split: 1,077 training, 270 calibration and 450 test images. The demo scores with OCNNA on
the calibration split, prunes, distils on the training split (the original model teaches) and
reports held-out accuracy on the test split. Nothing is downloaded.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from onnx_ocnna import api
from onnx_ocnna.evaluate import HeldOut


def digits_model_and_data() -> tuple[onnx.ModelProto, dict[str, dict[str, np.ndarray]]]:
    """The shipped model and its splits: name -> {"input": [N, 1, 8, 8] float32, "labels": [N]}."""
    from sklearn.datasets import load_digits

    data = resources.files("onnx_ocnna.data")
    model = onnx.load_from_string(data.joinpath("digits_cnn.onnx").read_bytes())
    split = json.loads(data.joinpath("digits_split.json").read_text())
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    arrays = {name: {split["input"]: images[split[name]], "labels": labels[split[name]]}
              for name in ("train", "calibration", "test")}
    return model, arrays


#: Where the demo writes its compressed model unless told otherwise (the working directory).
DEFAULT_OUTPUT = "digits_cnn.ocnna.onnx"


def run_demo(percentile: float = 40.0, epochs: int = 20, output: str | Path = DEFAULT_OUTPUT,
             overwrite: bool = False, progress: bool = True, seed: int = 0) -> str:
    """Compress, distil, time and evaluate the digits CNN, write the result to ``output``;
    returns the printed summary.

    The recipe is the main command's default (``onnx-ocnna IN OUT --calib DATA``: OCNNA, the
    ``percentile`` per group, least-squares reconstruction on the calibration data), then
    ``epochs`` of distillation.
    """
    from onnx_ocnna.errors import InputError
    from onnx_ocnna.evaluate import compare_latency
    from onnx_ocnna.model_io import check_output_path, save_model

    output = check_output_path("<demo>", output)
    if output.exists() and not overwrite:  # said before a minute of work, not after
        raise InputError(f"{output} exists; pass --overwrite to replace it or --output to choose another file")
    start = time.perf_counter()
    model, data = digits_model_and_data()
    options = {"batch_size": 64}
    test = api.as_source(data["test"], model, batch_size=256)
    held_out = HeldOut(model, test.batches)
    pruned, report = api.compress(model, data["calibration"], percentile=percentile, calibration_options=options,
                                  progress=progress, eval_data=held_out)
    distilled, kd = api.distill(pruned, model, data["train"], epochs=epochs, hflip=False, eval_data=data["test"],
                                calibration_options=options, progress=progress, seed=seed)
    report.timings["distill_s"] = kd.seconds
    after_kd = held_out.measure(distilled)
    report.record_accuracy("distilled", after_kd)
    latency = compare_latency(model, distilled, runs=50)
    save_model(distilled, output)
    lines = [
        f"digits CNN (scikit-learn digits, {test.num_samples} held-out test images): OCNNA k = {percentile:g} "
        f"with reconstruction (the main command's default), then {epochs} epoch(s) of distillation on "
        f"{len(data['train']['labels'])} training images",
        report.table(),
    ]
    for row in latency:
        lines.append(f"ONNX Runtime latency, batch {row['batch']}, {row['threads']} thread{'s' if row['threads'] > 1 else ''}: "
                     f"{row['before_ms']:.3f} ms -> {row['after_ms']:.3f} ms (speed-up {row['speedup']:.2f}x)")
    lines.append(f"wrote the compressed model to {output.resolve()}")
    lines.append(f"total time {time.perf_counter() - start:.1f} s")
    return "\n".join(lines)
