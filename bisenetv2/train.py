"""Train BiSeNetV2 (Yu et al., IJCV 2021) on Cityscapes or your own data.

    python bisenetv2/train.py                                  # one process: a GPU, else the CPU
    torchrun --nproc_per_node=2 bisenetv2/train.py --fp16      # two GPUs, mixed precision
    python bisenetv2/train.py --quickstart                     # toy data, a few minutes on a CPU
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dataclasses import replace  # noqa: E402

from lib.config import TrainConfig  # noqa: E402
from lib.trainer import main  # noqa: E402

# The paper's Cityscapes recipe with the seed's tips: 150k iterations of 16 images, 512x1024 crops
# of images rescaled in (0.25, 2.0) (the paper's (0.75, 2.0) of 1024x2048 crops resized by 1/2 is a
# narrower range), SGD lr 5e-2, OHEM on the main and the four booster outputs, from scratch.
RECIPE = TrainConfig(
    model="bisenetv2",
    pretrained="none",
    crop_size=(512, 1024),
    scale_range=(0.25, 2.0),
    max_iter=150_000,
    batch_size=16,
    lr=5e-2,
    warmup_iter=1000,
)

# About 8 minutes on a 2-core laptop CPU: the toy Cityscapes dataset (generated on first use,
# 128x256 images). The heads' 10x learning rate is left out: on 150 small images it overshoots.
QUICKSTART = replace(
    RECIPE,
    data_root="data/toy_cityscapes",
    generate_toy=True,
    crop_size=(128, 256),
    scale_range=(0.75, 1.5),
    max_iter=800,
    batch_size=8,
    lr=3e-2,
    head_lr_mult=1.0,
    warmup_iter=50,
    num_workers=2,
    log_every=50,
    checkpoint_every=200,
    runs_dir="res/quickstart",
)

if __name__ == "__main__":
    main(RECIPE, description=__doc__, presets={"quickstart": QUICKSTART})
