import pytest
import torch
from torch import nn

from lib.training.optim import WarmupPolyLR, build_optimizer


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


class HeadWithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, bias=False)
        self.head = nn.Sequential(nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4),
                                  nn.Conv2d(4, 2, 1))
        self.frozen = nn.Conv2d(2, 2, 1)
        self.frozen.requires_grad_(False)

    def head_modules(self):
        return [self.head]


def test_head_norm_params_get_10x_lr_without_decay_and_empty_groups_are_dropped():
    model = HeadWithNorm()
    opt = build_optimizer(model, lr=0.02, weight_decay=1e-4)
    groups = {(g["lr"], g["weight_decay"], g["lr_mult"]): {id(p) for p in g["params"]}
              for g in opt.param_groups}
    # body has no 1-D parameter, so its no-decay group is empty and absent
    assert groups == {
        (0.02, 1e-4, 1.0): {id(model.body.weight)},
        (0.2, 1e-4, 10.0): {id(model.head[0].weight), id(model.head[2].weight)},
        (0.2, 0.0, 10.0): {id(model.head[1].weight), id(model.head[1].bias),
                           id(model.head[2].bias)},
    }


def test_real_model_parameters_are_partitioned():
    from lib.models.zoo import build_model

    model = build_model("bisenetv2", 19)
    opt = build_optimizer(model, lr=0.01)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    head_ids = {id(p) for m in model.head_modules() for p in m.parameters()}
    assert head_ids  # the model names its heads
    for group in opt.param_groups:
        for p in group["params"]:
            assert group["lr"] == (0.1 if id(p) in head_ids else 0.01)
            assert group["weight_decay"] == (5e-4 if p.ndim > 1 else 0.0)


def _optimizer():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    return torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 1.0}])


def _expected(it, max_iter=100, warmup=10, ratio=0.1, mode="exp", power=0.9):
    if it < warmup:
        return ratio ** (1 - it / warmup) if mode == "exp" else ratio + (1 - ratio) * it / warmup
    return (1 - (it - warmup) / (max_iter - warmup)) ** power


@pytest.mark.parametrize("mode", ["exp", "linear"])
def test_sequence_matches_formula_for_every_group(mode):
    opt = _optimizer()
    sched = WarmupPolyLR(opt, 100, 10, 0.1, warmup=mode)
    for it in range(101):  # Python float (float64) arithmetic on both sides: any CPU
        factor = _expected(it, mode=mode)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * factor, abs=1e-12)
        assert opt.param_groups[1]["lr"] == pytest.approx(1.0 * factor, abs=1e-12)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0


def test_state_dict_resumes_the_same_sequence():
    opt = _optimizer()
    sched = WarmupPolyLR(opt, 50, 5)
    for _ in range(20):
        opt.step()
        sched.step()
    state = sched.state_dict()
    rest = []
    for _ in range(10):
        opt.step()
        sched.step()
        rest.append(opt.param_groups[0]["lr"])
    opt2 = _optimizer()
    sched2 = WarmupPolyLR(opt2, 50, 5)
    sched2.load_state_dict(state)
    resumed = []
    for _ in range(10):
        opt2.step()
        sched2.step()
        resumed.append(opt2.param_groups[0]["lr"])
    assert resumed == rest


def test_bad_arguments():
    with pytest.raises(ValueError, match="warmup_iter"):
        WarmupPolyLR(_optimizer(), 10, 10)
    with pytest.raises(ValueError, match="'cosine'"):
        WarmupPolyLR(_optimizer(), 10, 2, warmup="cosine")


def test_no_warmup_starts_at_base_lr_and_stays_zero_after_max_iter():
    opt = _optimizer()
    sched = WarmupPolyLR(opt, 20, warmup_iter=0)
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0
    assert lrs[7] == pytest.approx((1 - 7 / 20) ** 0.9)
    assert lrs[20:] == [0.0] * 5


def test_group_lr_mult_is_kept_through_the_initial_lr():
    from lib.training.optim import build_optimizer

    model = torch.nn.Conv2d(2, 2, 1)
    model.head_modules = lambda: [model]
    opt = build_optimizer(model, lr=0.01)
    sched = WarmupPolyLR(opt, 100, 10, 0.1)
    for _ in range(30):
        opt.step()
        sched.step()
    expected = 0.1 * _expected(30)  # 10x head multiplier on 0.01
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected, expected])
