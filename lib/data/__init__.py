"""The data side: ``config`` (``DataConfig``: which dataset, where, classes, normalisation),
``dataset`` (image/label pairs read and checked, the named datasets, lists and folders),
``datasets/`` (one module per named dataset), ``checks`` (label scans, mean/std), ``transforms``
(training augmentation, evaluation normalisation), ``sampler`` (the infinite sharded sampler),
``toy`` and ``toy_cityscapes`` (toy datasets in the official layouts)."""
