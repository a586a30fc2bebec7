"""onnx-ocnna: structured filter pruning of CNNs directly on ONNX graphs.

The Python API (see :mod:`onnx_ocnna.api`)::

    import onnx_ocnna
    model, report = onnx_ocnna.compress("in.onnx", "images/", percentile=40)
"""

__version__ = "0.1.0"

import importlib

# The API is imported on first use (PEP 562), not with the package: `onnx-ocnna` then reaches
# its Ctrl-C handler after a few ms instead of after the second it takes to import onnx, numpy
# and ONNX Runtime, so an interrupt while those load ends cleanly too.
_EXPORTS = {"compress": "api", "score": "api", "inspect": "api", "apply_plan": "api", "distill": "api",
            "load_model": "model_io", "save_model": "model_io"}

__all__ = ["compress", "score", "inspect", "apply_plan", "distill", "load_model", "save_model", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:
        try:  # `import onnx_ocnna; onnx_ocnna.api.Pruner` worked when the package imported api
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value
