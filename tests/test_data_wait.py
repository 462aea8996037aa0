"""The data-wait meter: a real training run on a dataset that really sleeps in ``__getitem__``
reports, in every log line and in TensorBoard, the fraction of the time it waited for batches,
and says once which option would help."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lib.data.toy_cityscapes import generate_toy_cityscapes

REPO = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"iter (\d+)/\d+ .*\| ([0-9.]+) s/it \| data (\d+)% \|")
SLEEP_S = 0.3

SCRIPT = """
import json, sys, time
import lib.training.setup as setup
import lib.training.trainer as trainer
from lib.training.config import TrainConfig
from lib.data.dataset import SegmentationDataset

slept = []

class SlowDataset(SegmentationDataset):
    def __getitem__(self, item):
        tic = time.perf_counter()
        time.sleep({sleep})
        slept.append(time.perf_counter() - tic)
        return super().__getitem__(item)

build_dataset = setup.build_dataset

def build_slow_dataset(data, split, transform=None, **kwargs):
    dataset = build_dataset(data, split, transform, **kwargs)
    if split == "train":
        dataset.__class__ = SlowDataset
    return dataset

setup.build_dataset = build_slow_dataset
trainer.main(TrainConfig(), sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(slept, f)
"""


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    generate_toy_cityscapes(root, n_train=8, n_val=2, height=64, width=128, seed=0)
    return root


def test_log_and_tensorboard_report_the_measured_wait(toy_root, tmp_path):
    script = tmp_path / "slow_train.py"
    script.write_text(SCRIPT.format(sleep=SLEEP_S))
    out, slept_file = tmp_path / "run", tmp_path / "slept.json"
    batch, log_every = 2, 2
    args = ["--data-root", str(toy_root), "--device", "cpu", "--output-dir", str(out),
            "--crop-size", "64", "128", "--scale-range", "0.75", "1.25", "--max-iter", "6",
            "--warmup-iter", "2", "--batch-size", str(batch), "--num-workers", "0",
            "--log-every", str(log_every), "--checkpoint-every", "0", "--no-eval-at-end"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(slept_file), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log

    slept = json.loads(slept_file.read_text())
    per_interval = batch * log_every
    assert len(slept) == 6 * batch  # no worker prefetches ahead with --num-workers 0
    lines = LOG_LINE.findall(log)
    assert [int(it) for it, _, _ in lines] == [2, 4, 6]
    reported = []
    for k, (_, sec_per_it, data_pct) in enumerate(lines):
        elapsed = float(sec_per_it) * log_every
        waited = sum(slept[k * per_interval:(k + 1) * per_interval])
        measured = 100 * waited / elapsed
        # at least the sleep (minus the log's rounding); at most the sleep plus decoding and
        # cropping 4 tiny images and collating them
        assert measured - 1.5 <= int(data_pct) <= measured + 4, (k, measured, log)
        reported.append(int(data_pct))

    # TensorBoard holds the same fractions
    events = EventAccumulator(str(out), size_guidance={"scalars": 0})
    events.Reload()
    recorded = [(e.step, e.value) for e in events.Scalars("train/data_wait")]
    assert [step for step, _ in recorded] == [2, 4, 6]
    for (_, value), pct in zip(recorded, reported, strict=True):
        assert abs(100 * value - pct) <= 0.5

    # waiting more than a fifth of the time: one piece of advice, not from the first interval
    # (it includes starting the run); 0.6 s of sleep per iteration against a step of a fraction
    # of a second keeps the later intervals far above a fifth
    assert reported[1] > 20
    advice = [line for line in log.splitlines() if "waited for data" in line]
    assert len(advice) == 1, log
    assert f"waited for data {reported[1]}%" in advice[0]
    assert "--num-workers" in advice[0]  # 0 workers given; the cache is on (the default)
    assert "--data-cache" not in advice[0]
