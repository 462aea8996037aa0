"""Evaluation: ``evaluator`` (the published protocol: single scale, crops, multi-scale, flip; the
confusion matrix and its metrics) and ``command`` (the ``evaluate.py`` command line, and the one
function that decides an evaluation's dataset and protocol)."""
