"""Runs that do not collide, and resume that honours the command line. Real training processes
started from a scratch working directory (so ``res/`` is theirs), real files."""

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import train_command

import demo
from bisenetv2.train import RECIPE
from lib.evaluation.command import main as evaluate_main
from lib.models.checkpoint import default_checkpoint, load_checkpoint, save_checkpoint
from lib.training import trainer
from lib.training.config import TrainConfig, parse_config
from lib.training.runs import (
    DEFINING_FIELDS,
    FREE_FIELDS,
    SCHEDULE_FIELDS,
    list_runs,
    new_run_dir,
    plan_run,
)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
LR = re.compile(r"iter (\d+)/\d+ \| lr ([0-9.e-]+) ")


def _train(cwd: Path, toy_root: Path, *extra: str, ok: bool = True) -> str:
    """bisenetv2/train.py run from ``cwd``: its default run folders are ``cwd/res/bisenetv2``."""
    # no --output-dir: the default run folders are what these tests are about
    cmd = [arg for arg in train_command(toy_root, Path(), "--log-every", "1",
                                        "--checkpoint-every", "2", "--keep-checkpoints", "1",
                                        "--no-eval-at-end", *extra,
                                        script=str(REPO / "bisenetv2/train.py"))]
    del cmd[cmd.index("--output-dir"):cmd.index("--output-dir") + 2]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_runs(toy_root, tmp_path_factory):
    """The same command run twice from one working directory: a longer run, then a shorter one."""
    cwd = tmp_path_factory.mktemp("cwd")
    root = cwd / "res" / "bisenetv2"
    _train(cwd, toy_root, "--max-iter", "4")
    (first,) = [p.parent for p in root.rglob("model_final.pth")]
    first_files = {p.name: _digest(p) for p in first.glob("*.pth")}
    assert first_files.keys() == {"checkpoint_iter0000002.pth", "model_final.pth"}
    _train(cwd, toy_root, "--max-iter", "3")
    return cwd, first, first_files


def test_rerunning_a_command_keeps_both_runs_and_resume_auto_continues_the_newest(
        toy_root, two_runs, monkeypatch, capsys):
    cwd, first, first_files = two_runs
    root = cwd / "res" / "bisenetv2"
    finals = sorted(root.rglob("model_final.pth"))
    assert len(finals) == 2, finals  # both runs' final models are reachable
    (second,) = [p.parent for p in finals if p.parent != first]
    # the first run's files are untouched; the second run's checkpoint survived its pruning
    assert {p.name: _digest(p) for p in first.glob("*.pth")} == first_files
    assert load_checkpoint(second / "checkpoint_iter0000002.pth")["iteration"] == 2
    assert load_checkpoint(second / "model_final.pth")["iteration"] == 3
    assert list_runs(root) == [first, second]

    # --resume auto continues the newest run, which is finished: it says so and exits 0
    log = _train(cwd, toy_root, "--max-iter", "3", "--resume", "auto")
    assert f"run {Path('res/bisenetv2') / second.name} is finished at iteration 3" in log, log
    assert "nothing to do" in log and "iter 4/" not in log
    assert list_runs(root) == [first, second]
    monkeypatch.chdir(cwd)

    # evaluate.py / demo.py without --ckpt: no res/model_final.pth, so the newest trained model
    results = evaluate_main(["--data-root", str(toy_root), "--device", "cpu",
                             "--num-workers", "0"])
    assert set(results) == {"ss"}
    image = next((toy_root / "leftImg8bit" / "val").rglob("*.png"))
    assert demo.main(["--img-path", str(image), "--device", "cpu", "--output", "out"]) == [
        Path("out") / f"{image.stem}.png"]
    said = f"using the newest trained model, res/bisenetv2/{second.name}/model_final.pth"
    assert capsys.readouterr().err.count(said) == 2


def test_resume_applies_a_new_schedule_and_refuses_changed_run_options(toy_root, two_runs,
                                                                       monkeypatch):
    cwd, first, _ = two_runs
    (second,) = [p for p in list_runs(cwd / "res" / "bisenetv2") if p != first]
    # the finished newest run extended: from the resumed iteration on, the learning rate is the
    # one of a run started with --max-iter 5 (warm-up 1 iteration, poly 0.9 from lr 0.05)
    log = _train(cwd, toy_root, "--max-iter", "5", "--resume", "auto")
    assert "max_iter: extending 3 -> 5" in log and f"{second.name}/model_final.pth" in log, log
    resumed = [(int(i), float(lr)) for i, lr in LR.findall(log)]
    assert [i for i, _ in resumed] == [4, 5]
    # the log prints the lr to 6 significant digits (Python float arithmetic: any CPU)
    assert resumed[0][1] == pytest.approx(0.05 * (1 - 3 / 4) ** 0.9, rel=1e-5)
    assert resumed[1][1] == 0
    assert load_checkpoint(second / "model_final.pth")["iteration"] == 5

    # options that define the run must match: every difference is named, nothing is trained
    monkeypatch.chdir(cwd)
    before = {p: _digest(p) for p in second.glob("*.pth")}
    with pytest.raises(ValueError) as refused:
        trainer.train(parse_config(RECIPE, [
            "--data-root", str(toy_root), "--crop-size", "64", "96", "--batch-size", "2",
            "--warmup-iter", "1", "--max-iter", "8", "--resume", "auto", "--seed", "3"]))
    assert "--crop-size: (64, 128) in the checkpoint, (64, 96) now" in str(refused.value)
    assert "--seed: 0 in the checkpoint, 3 now" in str(refused.value)
    assert {p: _digest(p) for p in second.glob("*.pth")} == before
    # a new run is refused in a folder holding another run, with the way out
    with pytest.raises(ValueError, match="already holds a run.*--resume auto"):
        trainer.train(parse_config(RECIPE, ["--data-root", str(toy_root), "--output-dir",
                                            str(first), "--device", "cpu"]))


def test_every_config_field_has_a_resume_rule():
    fields = list(TrainConfig().as_flat_dict())
    groups = DEFINING_FIELDS + SCHEDULE_FIELDS + FREE_FIELDS
    assert sorted(groups) == sorted(fields), set(fields) ^ set(groups)


def test_run_folders_are_never_reused(tmp_path):
    a, b = new_run_dir(tmp_path, now=0), new_run_dir(tmp_path, now=0)  # the same second
    assert a != b and b.name == f"{a.name}-2" and a.is_dir() and b.is_dir()
    plan = plan_run(str(tmp_path / "runs"), "", None)
    assert plan.new and plan.run_dir.parent == tmp_path / "runs"
    assert plan_run(str(tmp_path / "runs"), "", "auto").run_dir == plan.run_dir
    save_checkpoint(plan.run_dir / "checkpoint_iter0000002.pth", {"state_dict": {}})
    with pytest.raises(ValueError, match="already holds a run.*--resume auto"):
        plan_run("unused", str(plan.run_dir), None)


def test_default_checkpoint_prefers_the_published_file_then_the_newest_run(tmp_path, capsys):
    res = tmp_path / "res"
    weights = {"state_dict": {"w": torch.zeros(1)}}
    old = save_checkpoint(res / "bisenetv2" / "a" / "model_final.pth", weights)
    new = save_checkpoint(res / "quickstart" / "b" / "model_final.pth", weights)
    os.utime(old, ns=(1, 1))
    assert default_checkpoint(res / "model_final.pth", res) == new
    assert str(new) in capsys.readouterr().err
    save_checkpoint(res / "model_final.pth", weights)
    assert default_checkpoint(res / "model_final.pth", res) == res / "model_final.pth"
