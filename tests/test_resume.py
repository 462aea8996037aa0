"""No lost work: a run killed with SIGKILL, or stopped with SIGTERM at random moments, and resumed
ends exactly like an uninterrupted run; damaged checkpoints are skipped; Ctrl-C saves a checkpoint.
Real processes, signals and files."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_command

from lib.models.checkpoint import load_checkpoint
from lib.training.runs import CHECKPOINT_PATTERN, list_checkpoints

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _command(toy_root, out, *extra):
    return train_command(toy_root, out, "--max-iter", "30", "--warmup-iter", "2", "--log-every",
                         "1", "--checkpoint-every", "2", "--keep-checkpoints", "2",
                         "--no-eval-at-end", *extra)


def _run(cmd):
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def reference(toy_root, tmp_path_factory):
    """The uninterrupted run: its log and its final checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    log = _run(_command(toy_root, out))
    return log, load_checkpoint(out / "model_final.pth")


def _run_until(cmd, line_start, sig, delay=0.0):
    """Start ``cmd``, send ``sig`` ``delay`` seconds after a line containing ``line_start``."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line_start in line:
            time.sleep(delay)  # lands anywhere in a later iteration: data, forward, step, save
            proc.send_signal(sig)
            break
    lines.extend(proc.stdout)
    return proc.wait(timeout=120), "".join(lines)


def _lrs(log):
    return [line.split("| lr ")[1].split(" |")[0] for line in log.splitlines() if "| lr " in line]


def _assert_same_weights(final, reference):
    assert final["iteration"] == reference["iteration"] == 30
    assert final["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key


def test_sigkill_then_resume_equals_uninterrupted_run(toy_root, tmp_path, reference):
    reference_log, reference = reference

    # a random iteration after the second checkpoint (at 2 and 4), so one survives the damage
    kill_at = int(np.random.default_rng().integers(5, 12))
    code, killed_log = _run_until(_command(toy_root, tmp_path / "run"), f"iter {kill_at}/30",
                                  signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (tmp_path / "run" / "model_final.pth").exists()
    # the newest checkpoint is damaged (a crash while copying it, a full disk...): it is skipped
    newest = list_checkpoints(tmp_path / "run")[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed_log = _run(_command(toy_root, tmp_path / "run", "--resume", "auto"))
    assert "skipping unusable checkpoint" in resumed_log and newest.name in resumed_log
    final = load_checkpoint(tmp_path / "run" / "model_final.pth")

    start = int(resumed_log.split("at iteration ")[1].split()[0])
    assert _lrs(resumed_log) == _lrs(reference_log)[start:]
    _assert_same_weights(final, reference)


def test_sigterm_at_random_moments_then_resume_equals_uninterrupted_run(toy_root, tmp_path,
                                                                        reference):
    rng = np.random.default_rng()
    out, done = tmp_path / "run", 0
    command = _command(toy_root, out, "--resume", "auto")  # as a cluster job script would
    for _ in range(3):
        after = int(rng.integers(done + 1, done + 6))
        code, log = _run_until(command, f"iter {after}/30", signal.SIGTERM,
                               delay=float(rng.uniform(0, 0.5)))
        assert code == 130, log
        if done:
            resumed_from = out / CHECKPOINT_PATTERN.format(done)
            assert f"resumed from {resumed_from} at iteration {done}" in log
        stopped = int(re.search(r"stopping after iteration (\d+)", log)[1])
        assert after <= stopped < 30
        # the checkpoint is a whole iteration: the one the loop stopped after
        assert load_checkpoint(out / CHECKPOINT_PATTERN.format(stopped))["iteration"] == stopped
        assert "Traceback" not in log
        done = stopped
    _run(command)
    _assert_same_weights(load_checkpoint(out / "model_final.pth"), reference[1])


def test_ctrl_c_saves_a_checkpoint_before_exiting(toy_root, tmp_path):
    code, log = _run_until(_command(toy_root, tmp_path / "int", "--checkpoint-every", "0",
                                    "--max-iter", "300"), "iter 3/300", signal.SIGINT)
    assert code == 130, log
    saved = list_checkpoints(tmp_path / "int")
    assert len(saved) == 1 and 3 <= load_checkpoint(saved[0])["iteration"] < 300
    assert "optimizer" in load_checkpoint(saved[0])
