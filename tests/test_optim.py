import torch
from torch import nn

from lib.optim import build_optimizer


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1, bias=True)

    def head_modules(self):
        return [self.head]


def test_every_parameter_in_one_group_with_the_right_lr_and_decay():
    model = Tiny()
    opt = build_optimizer(model, lr=0.01, weight_decay=5e-4, head_lr_mult=10)
    where = {}
    for group in opt.param_groups:
        for p in group["params"]:
            assert id(p) not in where
            where[id(p)] = (group["lr"], group["weight_decay"])
    assert len(where) == len(list(model.parameters()))
    assert where[id(model.body[0].weight)] == (0.01, 5e-4)
    assert where[id(model.body[1].weight)] == (0.01, 0.0)  # BatchNorm weight: no decay
    assert where[id(model.body[1].bias)] == (0.01, 0.0)
    assert where[id(model.head.weight)] == (0.1, 5e-4)  # head: 10x lr
    assert where[id(model.head.bias)] == (0.1, 0.0)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


def test_model_without_heads_gets_no_multiplied_group():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = build_optimizer(model, lr=0.01)
    assert {g["lr"] for g in opt.param_groups} == {0.01}
