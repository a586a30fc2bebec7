"""Side-by-side benchmark of onnx-ocnna against onnxsim and Torch-Pruning (``python tools/bench/run.py``).

Modules: ``run`` (the command), ``worker`` (one tool in its own process, for its time and peak
memory), ``peers`` (one function per tool), ``cifar_resnet`` (the CIFAR ResNets in PyTorch for
Torch-Pruning), ``common`` (data, files, measurements), ``tables`` (Markdown from the results).
Kept free of imports so a worker process only pays for the tool it runs.
"""
