"""onnx-ocnna: structured filter pruning of CNNs directly on ONNX graphs."""

__version__ = "0.1.0"
