"""What the model folders (``bisenetv1/``, ``bisenetv2/``, ``diss/``, ``fp16/``) share, one package
per concern; each package's ``__init__`` says what lives in it.

* ``common``: processes (distributed set-up), logging and progress bars, pictures.
* ``data``: datasets (the named ones, lists, folders), their checks, transforms, the sampler,
  the typed ``DataConfig`` and the toy data generator.
* ``models``: the variant registry, shared layers, pretrained backbones, published weights and
  model files (checkpoints as files).
* ``deployment``: the inference form, runtimes (PyTorch, ONNX Runtime, OpenVINO), exports, int8.
* ``evaluation``: the evaluator (the published protocol) and the ``evaluate.py`` command.
* ``training``: the recipe (``TrainConfig``), set-up and resume, the loop, checkpoints of a run,
  divergence, validation, EMA, monitoring, optimiser, schedule and loss.

Imports go one way: common <- data <- models <- deployment <- evaluation <- training.
"""
