"""Training, in the order a run goes through it: ``config`` (the recipe ``TrainConfig``),
``trainer`` (``train`` and the scripts' ``main``), ``setup`` (run folder, resume checks, model,
optimiser, loader), ``loop`` (the iterations), ``step`` (memory format, compile, autocast),
``state`` (``RunState`` and its checkpoint), ``runs`` (run folders, resume rules, checkpoint
files), ``divergence``, ``stopping`` (signals), ``validation``, ``ema``, ``monitor``
(TensorBoard, history), ``final`` (final files and evaluation), ``optim`` (SGD groups, schedule),
``loss`` (OHEM) and ``sync_batchnorm`` (BatchNorm synchronised over gloo)."""
