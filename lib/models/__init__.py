"""Models: ``registry`` (what a variant declares), ``zoo`` (the variants registered: this
repository's folders and ``$BISENET_MODELS``), ``layers`` (shared blocks), ``pretrained``
(ImageNet backbones), ``published`` (the published weights by name) and ``checkpoint`` (model
files: atomic save, safe load, building a model from a file, fine-tuning weights)."""
