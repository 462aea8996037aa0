"""Train BiSeNetV2 (Yu et al., IJCV 2021) on Cityscapes or your own data.

    python bisenetv2/train.py                                  # one process: a GPU, else the CPU
    torchrun --nproc_per_node=2 bisenetv2/train.py --fp16      # two GPUs, mixed precision
    python bisenetv2/train.py --quickstart                     # toy data, a few minutes on a CPU
    torchrun --nproc_per_node=2 bisenetv2/train.py --published # the published weights' recipe
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dataclasses import replace  # noqa: E402

from lib.config import TrainConfig  # noqa: E402
from lib.trainer import main  # noqa: E402

# The paper's Cityscapes recipe (section 4.1), with the seed's tips, which gave 74.39 mIoU (ss):
# 150k iterations of 16 images, 512x1024 crops of images rescaled in (0.25, 2.0) (the paper's
# (0.75, 2.0) of 1024x2048 crops resized by 1/2 is a narrower range), SGD lr 5e-2 on every layer
# (no higher rate for the heads), OHEM on the main and the four booster outputs, from scratch.
RECIPE = TrainConfig(
    model="bisenetv2",
    pretrained="none",
    crop_size=(512, 1024),
    scale_range=(0.25, 2.0),
    max_iter=150_000,
    batch_size=16,
    lr=5e-2,
    head_lr_mult=1.0,
    warmup_iter=1000,
    eval_modes=("ss",),
)

# The recipe of the published model_final_v2_city.pth (74.95 ss / 75.58 ssc / 76.53 msf /
# 77.08 mscf): lr 5e-3 with 10x on the head and booster heads, detail and semantic branches from
# the ImageNet-pretrained backbone_v2.pth, fp16 autocast and SyncBatchNorm (2 GPUs x 8 images).
PUBLISHED = replace(
    RECIPE,
    pretrained="auto",
    lr=5e-3,
    head_lr_mult=10.0,
    fp16=True,
    sync_bn=True,
)

# About 8 minutes on a 2-core laptop CPU: the toy Cityscapes dataset (generated on first use,
# 128x256 images), smaller crops and far fewer iterations, and no colour jitter: on a short run
# it costs far more than it regularises wherever colour carries meaning (about 9 mIoU points on
# toy scenes whose colours are partly informative), as it does in real street scenes.
QUICKSTART = replace(
    RECIPE,
    data_root="data/toy_cityscapes",
    generate_toy=True,
    crop_size=(128, 256),
    scale_range=(0.75, 1.5),
    max_iter=800,
    batch_size=8,
    lr=3e-2,
    jitter=0.0,
    warmup_iter=50,
    num_workers=2,
    log_every=50,
    checkpoint_every=200,
    runs_dir="res/quickstart",
    # two single-scale validations of the 30 toy images: a few seconds against minutes of training
    eval_every=400,
)

if __name__ == "__main__":
    main(RECIPE, description=__doc__, presets={"quickstart": QUICKSTART, "published": PUBLISHED})
