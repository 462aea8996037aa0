import pytest

from lib.config import TrainConfig, parse_config


def test_recipe_values_are_the_defaults_and_options_override_them():
    recipe = TrainConfig(model="bisenetv1", lr=1e-2, crop_size=(1024, 1024), max_iter=80_000)
    cfg = parse_config(recipe, [])
    assert cfg == recipe
    cfg = parse_config(recipe, ["--lr", "0.02", "--crop-size", "64", "128", "--max_iter", "7",
                                "--warmup-iter", "2", "--no-eval-at-end", "--fp16"])
    assert cfg.lr == 0.02 and cfg.crop_size == (64, 128) and cfg.max_iter == 7
    assert cfg.eval_at_end is False and cfg.fp16 is True
    assert cfg.model == "bisenetv1"  # untouched fields keep the recipe's value


def test_legacy_launcher_local_rank_is_accepted_in_both_spellings():
    for flag in ("--local-rank=1", "--local_rank=1"):
        assert parse_config(TrainConfig(), [flag]).model == "bisenetv2"


def test_preset_switches_defaults_and_still_allows_overrides():
    quick = TrainConfig(max_iter=10, warmup_iter=2, batch_size=2)
    cfg = parse_config(TrainConfig(), ["--quickstart", "--batch-size", "4"],
                       presets={"quickstart": quick})
    assert (cfg.max_iter, cfg.batch_size) == (10, 4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet"], "--model 'resnet'"),
        (["--ignore-index", "3"], "--ignore-index 3 is a valid class id"),
        (["--warmup-iter", "200", "--max-iter", "100"], "--warmup-iter (200)"),
        (["--eval-modes", "ss", "tta"], "unknown --eval-modes"),
        (["--scale-range", "2.0", "0.5"], "--scale-range"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(TrainConfig(), argv)
