"""onnx-ocnna: structured filter pruning of CNNs directly on ONNX graphs.

The Python API (see :mod:`onnx_ocnna.api`)::

    import onnx_ocnna
    model, report = onnx_ocnna.compress("in.onnx", "images/", percentile=40)
"""

__version__ = "0.1.0"

from onnx_ocnna.api import apply_plan, compress, distill, inspect, score  # noqa: E402
from onnx_ocnna.model_io import load_model, save_model  # noqa: E402

__all__ = ["compress", "score", "inspect", "apply_plan", "distill", "load_model", "save_model", "__version__"]
