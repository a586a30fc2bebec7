"""Calibration data: readers for image folders, .npy/.npz arrays and ONNX Runtime readers.

Every source is opened against the model it feeds (:func:`open_calibration`) and yields
:class:`Batch` objects whose ``feeds`` map each model input name to an array [B, ...] of the
input's element type. Errors in the data raise :class:`~onnx_ocnna.errors.InputError`.

The package's rooms: ``opening`` (:func:`open_calibration`: dispatch, subset selection,
batching), ``sources`` (the source classes), ``images`` (folder scan, decoding, resizing),
``presets`` (the preset JSON files in the repository's ``calibration/`` folder), ``inputs``
(model input specs and the checks data must pass) and ``ort_reader`` (ORT reader adapter).

Choices (documented here because callers rely on them):

* **Image folders** are read recursively. Non-hidden sub-folders of the root are classes
  (label = index in the sorted names, empty ones included so indices stay aligned with the
  names); images directly in the root mean "no labels"; both at once is an error.
* **Preprocessing** of an image: convert to RGB (L for a 1-channel input), resize to the
  model's H x W (bilinear) -- or, when a preset gives ``resize`` S, resize the shorter side to S
  and centre-crop H x W (torchvision's ``Resize(S)`` + ``CenterCrop``; with ``crop`` C != H x W the
  shorter side becomes ``S * max(H/C_h, W/C_w)`` so the crop keeps the same fraction), scale to
  [0, 1], then ``(x - mean) / std`` with mean/std on 0-1 pixels, all in float32 (bit-identical to
  torchvision's ToTensor + Normalize), finally cast to the input's dtype. There is no default:
  a folder needs a preset or mean/std (``raw``, 0-1 pixels, said on purpose), because a wrong
  normalisation gives accuracies that look plausible. A symbolic height/width is taken from the
  ``size`` option, else the preset's ``size``, else its ``crop``; without one that is an error.
  Layout: NCHW if dim 1 is 1 or 3, else NHWC if dim 3 is, else the preset must say ``layout``.
* **max_samples** picks a deterministic subset with ``numpy.random.default_rng(seed)``: with
  labels it is class-balanced (round robin over classes, each class shuffled, so 512 of 50,000
  CIFAR images are 51-52 per class, lower class indices taking the remainder); without labels
  a uniform random subset. The chosen
  samples are produced in their original (sorted) order.
* **Batching**: ``batch_size`` samples per batch, the last one smaller; a model whose batch
  dimension is fixed to B0 gets batches of exactly B0 (for B0 > 1 a remainder is dropped with a
  warning). ``CalibrationDataReader`` feeds pass through in the reader's own batches.
* **Arrays**: axis 0 is the sample axis; a ``.npy`` is memory-mapped (only the rows of the
  current batch are read), a ``.npz`` is read into memory (only the keys the model needs).
  Image options (preset, mean, std, size) do not apply to arrays and readers (a warning says so).
* **Readers** are re-iterated through ``rewind()`` when they have one; otherwise they can be
  iterated once and a second ``batches()`` call raises ``InputError``. Their feeds must have
  exactly the model's input names (as ``InferenceSession.run`` requires); they carry no labels.
* **Decoding** is streaming: one batch is decoded at a time, the next one in a background thread
  while the caller uses the current one. A thread pool inside a batch was measured slower for
  32x32 JPEGs (GIL-bound Python overhead) and only ~1.7x faster for 500x375 ones.
"""

from __future__ import annotations

from onnx_ocnna.calibration.images import IMAGE_EXTENSIONS
from onnx_ocnna.calibration.inputs import InputSpec, fixed_batch, model_fixed_batch, model_input_spec
from onnx_ocnna.calibration.opening import open_calibration
from onnx_ocnna.calibration.ort_reader import OrtReaderAdapter
from onnx_ocnna.calibration.presets import list_presets, load_preset
from onnx_ocnna.calibration.sources import Batch, CalibrationSource

__all__ = [
    "Batch",
    "CalibrationSource",
    "InputSpec",
    "OrtReaderAdapter",
    "IMAGE_EXTENSIONS",
    "list_presets",
    "load_preset",
    "fixed_batch",
    "model_fixed_batch",
    "model_input_spec",
    "open_calibration",
]
