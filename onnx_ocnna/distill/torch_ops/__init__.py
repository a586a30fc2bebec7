"""The PyTorch interpreter's operator handlers, one small file per family (the table: ``torch_graph.OPS``)."""
