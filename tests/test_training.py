"""End-to-end training runs on the CPU: one process, torchrun with 2 gloo processes, the legacy
launcher, and an overfit of a few toy images. Real processes, real files, real PNGs."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib.checkpoint import load_checkpoint, load_model
from lib.toy_cityscapes import generate_toy_cityscapes

REPO = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"iter (\d+)/(\d+) \| lr ([0-9.e-]+) \| samples (\d+)")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    generate_toy_cityscapes(root, n_train=8, n_val=4, height=64, width=128, seed=0)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def _train_args(toy_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data-root", str(toy_root), "--device", "cpu", "--output-dir", str(out),
        "--crop-size", "64", "128", "--scale-range", "0.75", "1.25", "--max-iter", "6",
        "--warmup-iter", "2", "--batch-size", "4", "--num-workers", "0", "--log-every", "1",
        "--checkpoint-every", "3", "--lr", "0.01", *extra,
    ]


def _schedule(log: str) -> list[tuple[int, float, int]]:
    return [(int(m[1]), float(m[3]), int(m[4])) for m in LOG_LINE.finditer(log)]


def test_one_and_two_processes_share_schedule_and_samples_and_checkpoint_evaluates(
    toy_root, tmp_path
):
    single = _run([sys.executable, "bisenetv2/train.py",
                   *_train_args(toy_root, tmp_path / "one", "--no-eval-at-end")])
    double = _run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={_free_port()}", "bisenetv2/train.py",
        *_train_args(toy_root, tmp_path / "two"),
    ])
    one, two = _schedule(single.stdout), _schedule(double.stdout)
    assert len(one) == 6 and one == two  # same iterations, learning rates and sample counts
    assert one[-1][2] == 6 * 4
    # lr follows the warm-up then the poly decay to 0 at max_iter
    assert one[-1][1] == pytest.approx(0.0, abs=1e-12) and one[0][1] < one[1][1]

    final = tmp_path / "two" / "model_final.pth"
    ckpt = load_checkpoint(final)
    assert ckpt["iteration"] == 6 and ckpt["model"] == "bisenetv2"
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint_iter*.pth")) == [
        "checkpoint_iter0000003.pth"]
    assert "mIoU" in double.stdout  # evaluated on val at the end
    assert (tmp_path / "two" / "example_prediction.png").is_file()
    model, meta = load_model(final)
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 64, 128)).shape == (1, 19, 64, 128)


def test_legacy_launcher_passes_local_rank_and_trains(toy_root, tmp_path):
    proc = _run([
        sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2",
        f"--master_port={_free_port()}", "bisenetv1/train.py", "--pretrained", "none",
        *_train_args(toy_root, tmp_path / "legacy", "--max-iter", "3", "--no-eval-at-end"),
    ])
    assert [s[0] for s in _schedule(proc.stdout)] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "legacy" / "model_final.pth")["model"] == "bisenetv1"
