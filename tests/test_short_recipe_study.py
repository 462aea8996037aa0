"""The bookkeeping of tools/short_recipe_study.py: which plain result may be reused, and the
training time read from a log."""

import json

from tools.short_recipe_study import log_seconds, reusable_plain


def _row(seconds: float, miou: float, seed: int | None = 0, budget: str = "wall",
         generator: dict | None = None) -> dict:
    row = {"set": "wide", "budget": budget, "generator": generator or {"seed": 101},
           "plain": {"seconds": seconds, "cpu_seconds": 2 * seconds, "miou": miou}}
    if seed is not None:
        row["seed"] = seed
    return row


def test_reused_plain_has_the_same_set_budget_seed_and_a_time_within_tolerance(tmp_path):
    results = tmp_path / "results.jsonl"
    rows = [
        _row(500.0, 0.10, seed=None),               # written before seeds were recorded: seed 0
        _row(505.0, 0.20),                          # newer, seed 0, within 3%: the one to take
        _row(500.0, 0.30, seed=1),                  # another training seed
        _row(500.0, 0.40, budget="cpu"),            # another budget kind
        _row(500.0, 0.50, generator={"seed": 202}), # another toy set
        _row(600.0, 0.60),                          # 20% longer
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    generator = {"seed": 101}
    assert reusable_plain(results, generator, "wall", 510.0)["miou"] == 0.20
    assert reusable_plain(results, generator, "wall", 510.0, seed=1)["miou"] == 0.30
    assert reusable_plain(results, generator, "wall", 510.0, seed=2) is None
    assert reusable_plain(results, generator, "wall", 540.0) is None  # 505 is 6.5% short
    # the cpu budget compares cpu seconds (1000 for that row), not wall seconds
    assert reusable_plain(results, generator, "cpu", 1010.0)["miou"] == 0.40
    assert reusable_plain(results, generator, "cpu", 510.0) is None
    assert reusable_plain(tmp_path / "absent.jsonl", generator, "wall", 500.0) is None


def test_log_seconds_run_from_the_first_line_to_the_final_model_across_midnight(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("23:59:50 INFO run folder: x\n"
                   "00:00:30 INFO iter 50/100 | saved checkpoint_iter0000050.pth\n"
                   "00:01:05 INFO saved x/model_final.pth\n"
                   "00:01:09 INFO training curves written\n")
    assert log_seconds(log) == 75.0
