"""Shared pieces of the BiSeNet repository: data, losses, schedules, training, evaluation."""
