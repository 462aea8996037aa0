"""Two gloo processes under torchrun: a SIGTERM to one rank stops both at the same iteration with
one checkpoint; a killed worker is restarted by ``torchrun --max-restarts`` and ``--resume auto``
continues; both end with the weights of an uninterrupted run. Real processes and signals."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port, train_command

from lib.models.checkpoint import load_checkpoint
from lib.training.runs import CHECKPOINT_PATTERN

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MAX_ITER = 10


def _torchrun(toy_root: Path, out: Path, *launcher: str) -> list[str]:
    launch = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
              f"--master_port={free_port()}", *launcher)
    return train_command(toy_root, out, "--max-iter", str(MAX_ITER), "--batch-size", "4",
                         "--log-every", "1", "--checkpoint-every", "3", "--no-eval-at-end",
                         "--resume", "auto", python=launch)


def _workers(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the training processes torchrun started."""
    pids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher_pid)], capture_output=True,
                          text=True).stdout.split()
    ranks = {}
    for pid in map(int, pids):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [v for v in environ if v.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0][5:])] = pid
    return ranks


def _run_and_signal(cmd: list[str], after_iter: int, rank: int, sig: int) -> tuple[int, str]:
    """Run ``cmd``; after the log line of ``after_iter`` (and a random pause) signal ``rank``."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"iter {after_iter}/{MAX_ITER}" in line:
            time.sleep(float(np.random.default_rng().uniform(0, 0.3)))
            os.kill(_workers(proc.pid)[rank], sig)
            break
    lines.extend(proc.stdout)
    return proc.wait(timeout=300), "".join(lines)


@pytest.fixture(scope="module")
def reference(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(_torchrun(toy_root, out), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return load_checkpoint(out / "model_final.pth")


def _assert_same_weights(path: Path, reference: dict) -> None:
    final = load_checkpoint(path)
    assert final["iteration"] == reference["iteration"] == MAX_ITER
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key


def test_sigterm_to_one_rank_stops_all_at_one_iteration_then_resume(toy_root, tmp_path,
                                                                      reference):
    out = tmp_path / "run"
    code, log = _run_and_signal(_torchrun(toy_root, out), 4, rank=1, sig=signal.SIGTERM)
    # torchrun reports the first worker's exit code, 130 (it then stops the other one)
    assert code != 0 and re.search(r"exitcode\s*:\s*130", log), log
    stopped = int(re.search(r"stopping after iteration (\d+)", log)[1])
    assert 4 <= stopped < MAX_ITER
    # rank 0 wrote one checkpoint of the stopping iteration
    saved = re.findall(rf"saved \S*{CHECKPOINT_PATTERN.format(stopped)}", log)
    assert len(saved) == 1, log
    assert load_checkpoint(out / CHECKPOINT_PATTERN.format(stopped))["iteration"] == stopped
    proc = subprocess.run(_torchrun(toy_root, out), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"at iteration {stopped}" in proc.stdout
    _assert_same_weights(out / "model_final.pth", reference)


def test_killed_worker_is_restarted_by_torchrun_and_resumes(toy_root, tmp_path, reference):
    out = tmp_path / "run"
    # after the checkpoint of iteration 3, kill rank 1 outright: no chance to save anything
    code, log = _run_and_signal(_torchrun(toy_root, out, "--max-restarts=1"), 5, rank=1,
                                sig=signal.SIGKILL)
    assert code == 0, log
    resumed = re.search(r"resumed from \S+ at iteration (\d+)", log)
    assert resumed and 3 <= int(resumed[1]) < MAX_ITER, log
    _assert_same_weights(out / "model_final.pth", reference)
