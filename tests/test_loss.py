import math

import numpy as np
import pytest
import torch

from lib.loss import OhemCrossEntropy


def _reference(logits, labels, thresh=0.7, ignore=255):
    """Straightforward per-pixel loop over numpy arrays."""
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
    return (hard if len(hard) >= n_min else losses[:n_min]).mean()


@pytest.mark.parametrize("scale", [3.0, 0.05])  # many hard pixels / almost none (min-kept branch)
def test_matches_reference_in_both_branches(scale):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 7) * scale
    labels = torch.randint(0, 4, (2, 6, 7))
    labels[0, :2] = 255
    if scale < 1:  # make most pixels easy: their class gets a big logit
        logits.scatter_(1, labels.clamp(max=3).unsqueeze(1), 10.0)
        labels[1, 0, :3] = (logits[1, :, 0, :3].argmin(0))  # a few hard ones
    loss = OhemCrossEntropy()(logits, labels)
    assert loss.item() == pytest.approx(_reference(logits, labels), rel=1e-5)


def test_all_ignored_batch_is_zero_with_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = OhemCrossEntropy()(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_half_precision_logits_are_computed_in_float32():
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.randint(0, 3, (1, 4, 4))
    criterion = OhemCrossEntropy()
    assert criterion(logits.bfloat16(), labels).dtype == torch.float32
