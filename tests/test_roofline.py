"""FLOPs and bytes counted from the graph, and the roofline's arithmetic, against hand counts."""

import pytest
import torch
from torch import nn

from lib.deployment.roofline import graph_cost, roofline_seconds


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_cost_of_a_tiny_conv_net_equals_the_hand_count(dtype):
    with torch.device("meta"):
        net = _tiny_net().to(dtype)
        x = torch.zeros(1, 3, 8, 8, dtype=dtype)
    flops, moved = graph_cost(lambda: net(x))
    size = 2 if dtype == torch.bfloat16 else 4
    pixels = 8 * 8
    # convolution: each of 4 x 64 outputs is a 27-term dot product; linear: 5 dot products of 256
    assert flops == 2 * (4 * pixels * (3 * 3 * 3)) + 2 * (5 * 256)
    conv = (3 * pixels) + (4 * 3 * 3 * 3) + 4 + (4 * pixels)  # input, weight, bias, output
    relu = 2 * (4 * pixels)  # in place: read and written
    linear = 5 + 256 + (256 * 5) + 5  # bias, input, weight (its transpose is a view), output
    assert moved == size * (conv + relu + linear)  # the flatten is a view: nothing moved


def test_roofline_is_the_slower_of_arithmetic_and_traffic():
    # 2 GFLOP at 100 GFLOP/s = 20 ms; 100 MB at 10 GB/s = 10 ms: arithmetic bound
    assert roofline_seconds(2e9, 1e8, 1e11, 1e10) == pytest.approx(0.02)
    # the same traffic at 2 GB/s = 50 ms: memory bound
    assert roofline_seconds(2e9, 1e8, 1e11, 2e9) == pytest.approx(0.05)
