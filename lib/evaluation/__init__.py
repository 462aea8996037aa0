"""Evaluation: ``evaluator`` (the published protocol: single scale, crops, multi-scale, flip),
``metrics`` (scores of a confusion matrix and the printed table), ``tiling`` (sliding-window
inference with the evaluator's crop arithmetic) and ``command`` (the ``evaluate.py`` command
line, and the one function that decides an evaluation's dataset and protocol)."""
