import pytest
import torch

from lib.lr_scheduler import WarmupPolyLR


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
    from lib.optim import build_optimizer

    model = torch.nn.Conv2d(2, 2, 1)
    model.head_modules = lambda: [model]
    opt = build_optimizer(model, lr=0.01)
    sched = WarmupPolyLR(opt, 100, 10, 0.1)
    for _ in range(30):
        opt.step()
        sched.step()
    expected = 0.1 * _expected(30)  # 10x head multiplier on 0.01
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected, expected])
