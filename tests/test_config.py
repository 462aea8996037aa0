import pytest

from bisenetv1.train import RECIPE as V1_RECIPE
from bisenetv2.train import PUBLISHED, QUICKSTART
from bisenetv2.train import RECIPE as V2_RECIPE
from diss.train import RECIPE as DISS_RECIPE
from fp16.train import RECIPE as FP16_RECIPE
from lib.training.config import TrainConfig, parse_config


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


def test_bisenetv2_defaults_are_the_paper_recipe_and_published_is_a_preset():
    presets = {"quickstart": QUICKSTART, "published": PUBLISHED}
    paper = parse_config(V2_RECIPE, [], presets=presets)
    # the paper / seed (74.39): lr 5e-2 on every layer, from scratch, 150k x 16, 512x1024 crops
    assert (paper.lr, paper.head_lr_mult, paper.pretrained) == (5e-2, 1.0, "none")
    assert (paper.max_iter, paper.batch_size, paper.crop_size) == (150_000, 16, (512, 1024))
    assert paper.scale_range == (0.25, 2.0) and not paper.fp16
    assert paper.eval_modes == ("ss",)
    # model_final_v2_city.pth: 5e-3 with 10x heads, backbone_v2.pth, fp16 + SyncBN
    published = parse_config(V2_RECIPE, ["--published"], presets=presets)
    assert (published.lr, published.head_lr_mult, published.pretrained) == (5e-3, 10.0, "auto")
    assert published.fp16 and published.sync_bn
    assert (published.max_iter, published.batch_size, published.crop_size) == (
        150_000, 16, (512, 1024))
    with pytest.raises(SystemExit):
        parse_config(V2_RECIPE, ["--published", "--quickstart"], presets=presets)


def test_bisenetv1_diss_fp16_keep_the_published_v1_recipe_and_end_with_ss_and_mscf():
    for recipe in (V1_RECIPE, DISS_RECIPE, FP16_RECIPE):
        assert (recipe.lr, recipe.head_lr_mult, recipe.max_iter, recipe.batch_size) == (
            1e-2, 10.0, 80_000, 16)
        assert recipe.crop_size == (1024, 1024) and recipe.scale_range == (0.75, 2.0)
        assert recipe.eval_modes == ("ss", "mscf") and recipe.eval_crop_size == (1024, 1024)
        assert recipe.eval_scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert FP16_RECIPE.fp16 and DISS_RECIPE.model == "diss"
