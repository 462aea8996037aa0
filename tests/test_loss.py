import math

import numpy as np
import pytest
import torch

from lib.training.loss import OhemCrossEntropy


def _reference(logits, labels, thresh=0.7, ignore=255):
    """Straightforward per-pixel loop in float64; also says which branch was taken."""
    logits, labels = logits.double().numpy(), labels.numpy()
    losses = []
    for n in range(labels.shape[0]):
        for y in range(labels.shape[1]):
            for x in range(labels.shape[2]):
                if labels[n, y, x] == ignore:
                    continue
                z = logits[n, :, y, x]
                log_sum = z.max() + math.log(np.exp(z - z.max()).sum())
                losses.append(log_sum - z[labels[n, y, x]])
    losses = np.sort(np.array(losses))[::-1]
    n_min = max(1, len(losses) // 16)
    hard = losses[losses > -math.log(thresh)]
    if len(hard) >= n_min:
        return hard.mean(), "threshold"
    return losses[:n_min].mean(), "min_kept"


def _batch(easy: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 12, 10, generator=gen) * 3
    labels = torch.randint(0, 5, (2, 12, 10), generator=gen)
    labels[0, :3] = 255  # some ignored pixels
    labels[1, 5, 2:7] = 255
    if easy:  # nearly every pixel confidently right; a handful (fewer than n_min) wrong
        logits = torch.randn(2, 5, 12, 10, generator=gen) * 0.1
        logits.scatter_(1, labels.clamp(max=4).unsqueeze(1), 8.0)
        logits[1, :, 0, :3] = torch.tensor([8.0, 0, 0, 0, 0]).unsqueeze(1)
        labels[1, 0, :3] = 3
    return logits, labels


@pytest.mark.parametrize(("easy", "branch"), [(False, "threshold"), (True, "min_kept")])
def test_matches_reference_in_both_branches(easy, branch):
    logits, labels = _batch(easy)
    expected, taken = _reference(logits, labels)
    assert taken == branch  # the data really exercises the intended branch
    loss = OhemCrossEntropy()(logits, labels)
    # float32 cross-entropy of <= 240 pixels against the float64 loop: ~1e-7 relative on any CPU
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_gradient_flows_only_through_kept_pixels():
    logits, labels = _batch(easy=True)
    logits.requires_grad_(True)
    OhemCrossEntropy()(logits, labels).backward()
    touched = logits.grad.abs().sum(1) > 0
    n_valid = int((labels != 255).sum())
    assert int(touched.sum()) == n_valid // 16  # exactly the min-kept pixels
    assert not touched[labels == 255].any()


def test_all_ignored_batch_is_zero_with_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = OhemCrossEntropy()(logits, torch.full((1, 4, 4), 255))
    assert loss.requires_grad and not torch.isnan(loss)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_low_precision_logits_and_autocast_use_float32():
    logits, labels = _batch(easy=False)
    expected, _ = _reference(logits.bfloat16().float(), labels)
    criterion = OhemCrossEntropy()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = criterion(logits.bfloat16(), labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_label_outside_classes_is_a_clear_error():
    logits, labels = _batch(easy=False)
    labels[0, 5, 5] = 7  # 5 classes, not the ignore index
    with pytest.raises(ValueError, match=r"\[7\]"):
        OhemCrossEntropy()(logits, labels)


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        OhemCrossEntropy(thresh=1.5)


def _ohem_float64(logits: torch.Tensor, labels: torch.Tensor, thresh: float = 0.7,
                  ignore: int = 255) -> tuple[torch.Tensor, str]:
    """OHEM as the reference implementation defines it, vectorised in float64 with a full sort:
    the mean loss of the pixels with p(true class) < thresh, or of the n_min = valid // 16
    largest losses if fewer are that hard. Differentiable (float64 autograd)."""
    keep = labels != ignore
    log_probs = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    true = log_probs.gather(1, torch.where(keep, labels, 0)[:, None])[:, 0]
    losses = -true[keep]
    n_min = max(1, losses.numel() // 16)
    hard = losses[torch.exp(-losses) < thresh]
    if hard.numel() >= n_min:
        return hard.mean(), "threshold"
    return losses.sort(descending=True).values[:n_min].mean(), "min_kept"


def _five_outputs(dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Five logit maps of one batch as a training step has them; the last two mostly right, so
    that both OHEM branches are taken in the same call."""
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 19, (2, 24, 40), generator=gen)
    labels[0, :5] = 255
    outputs = []
    for confidence in (0.0, 1.0, 2.0, 9.0, 12.0):
        logits = torch.randn(2, 19, 24, 40, generator=gen) * 2
        logits += confidence * torch.nn.functional.one_hot(labels.clamp(max=18), 19).permute(
            0, 3, 1, 2)
        outputs.append(logits.to(dtype))
    return outputs, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_losses_of_all_outputs_match_float64_reference(dtype):
    outputs, labels = _five_outputs(dtype)
    leaves = [o.detach().requires_grad_(True) for o in outputs]
    got = OhemCrossEntropy().output_losses(leaves, labels)
    assert got.dtype == torch.float32 and got.shape == (5,)
    got.sum().backward()
    branches = []
    for leaf, loss in zip(leaves, got, strict=True):
        logits = leaf.detach().double().requires_grad_(True)  # the same rounded inputs
        want, branch = _ohem_float64(logits, labels)
        branches.append(branch)
        want.backward()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert leaf.grad.dtype == dtype
        # float32 rounding, or that of the fp16/bf16 gradient (8 or 11 bits of mantissa)
        low = dtype != torch.float32
        scale = logits.grad.abs().max().item()
        torch.testing.assert_close(leaf.grad.double(), logits.grad, rtol=1e-2 if low else 1e-5,
                                   atol=(1e-2 if low else 1e-6) * scale)
    assert set(branches) == {"threshold", "min_kept"}  # both exercised
    # one call per output gives the same values
    for logits, loss in zip(outputs, got, strict=True):
        assert OhemCrossEntropy()(logits, labels).item() == pytest.approx(loss.item(), rel=1e-6)
