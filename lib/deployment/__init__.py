"""From a trained model to a fast one: ``inference`` (the inference form: BatchNorm folded, no
auxiliary heads), ``examples`` (prediction pictures), ``runtimes/`` (PyTorch, ONNX Runtime,
OpenVINO, ``auto``), ``export`` (ONNX, OpenVINO, AOTInductor files), ``verify`` (an export
checked against the eager model) and ``quantize`` (int8)."""
