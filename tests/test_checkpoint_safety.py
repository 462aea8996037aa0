"""A checkpoint that the weights-only loader refuses gets a clear word, and a trusted one can be
converted: real pickle files holding a custom class instance, a whole model, and a reference to
os.system (never executed: a marker file it would create must not appear)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lib.models.checkpoint import CheckpointError, load_checkpoint, load_model
from lib.models.zoo import build_model

REPO = Path(__file__).resolve().parents[1]


class _RunsACommand:
    """Unpickling this calls os.system(command): what a malicious checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _malicious(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    model = build_model("bisenetv2", 5, aux_heads=False)
    # pickling only records the reference; nothing runs here
    torch.save({"state_dict": model.state_dict(), "hook": _RunsACommand(f"touch {marker}")},
               path)
    return path, marker


def test_malicious_pickle_is_refused_with_a_clear_word_and_never_run(tmp_path):
    path, marker = _malicious(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert text.startswith(f"{path} holds Python objects other than tensors")
    assert "system" in text and "refused for safety" in text
    assert f"tools/convert_checkpoint.py --trust {path} {tmp_path / 'evil_weights.pth'}" in text
    assert "Please file an issue" not in text and "corrupt" not in text
    # the command line says the same, without a traceback, and runs nothing
    proc = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(path), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "holds Python objects other than tensors" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_trusted_checkpoint_with_a_custom_object_converts_to_the_same_weights(tmp_path):
    # a trusted file holding an instance of a class of the user's own code
    (tmp_path / "user_code.py").write_text(textwrap.dedent("""
        class TrainingMeta:
            def __init__(self):
                self.epoch = 7
    """))
    original = tmp_path / "trusted.pth"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import torch, user_code
        from lib.models.zoo import build_model
        torch.manual_seed(3)
        model = build_model("bisenetv1", 4, aux_heads=False)
        torch.save({{"state_dict": model.state_dict(), "meta": user_code.TrainingMeta(),
                    "epoch": 7}}, {str(original)!r})
        torch.save(model, {str(tmp_path / 'whole_model.pth')!r})
    """)], cwd=REPO, env=env, check=True, timeout=300)
    with pytest.raises(CheckpointError, match="user_code.TrainingMeta.*refused for safety"):
        load_checkpoint(original)
    converted = tmp_path / "converted.pth"
    refused = subprocess.run([sys.executable, "tools/convert_checkpoint.py", str(original),
                              str(converted)], cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "--trust" in refused.stderr and not converted.exists()
    subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--trust", str(original),
                    str(converted)], cwd=REPO, env=env, check=True, timeout=300)
    whole = tmp_path / "whole_converted.pth"
    subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--trust",
                    str(tmp_path / "whole_model.pth"), str(whole)], cwd=REPO, env=env,
                   check=True, timeout=300)
    torch.manual_seed(3)
    expected = build_model("bisenetv1", 4, aux_heads=False).state_dict()
    for path in (converted, whole):
        model, meta = load_model(path)
        assert (meta["model"], meta["n_classes"]) == ("bisenetv1", 4)
        state = model.state_dict()
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(state[key], value), key
