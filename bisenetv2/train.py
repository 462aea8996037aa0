"""Train BiSeNetV2 (Yu et al., IJCV 2021) on Cityscapes or your own data.

    python bisenetv2/train.py                                  # one process: a GPU, else the CPU
    torchrun --nproc_per_node=2 bisenetv2/train.py --fp16      # two GPUs, mixed precision
    python bisenetv2/train.py --quickstart                     # toy data, a few minutes on a CPU
    torchrun --nproc_per_node=2 bisenetv2/train.py --published # the published weights' recipe
    torchrun --nproc_per_node=8 bisenetv2/train.py --recipe ade20k   # also: coco, camvid
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from lib.training.config import TrainConfig, for_dataset
from lib.training.trainer import main

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
PUBLISHED = RECIPE.replace(
    pretrained="auto",
    lr=5e-3,
    head_lr_mult=10.0,
    fp16=True,
    sync_bn=True,
)

# About 10 minutes on a 2-core CPU with AVX-512: the toy Cityscapes dataset (generated on first use,
# 128x256 images), smaller crops and far fewer iterations, and no colour jitter: on a short run
# it costs far more than it regularises wherever colour carries meaning (about 9 mIoU points on
# toy scenes whose colours are partly informative), as it does in real street scenes. Scales
# down to 0.5, so that crops of images larger than the crop also show whole scenes: with 0.75 the
# recipe lost to a plain loop on 256x512 toy images (tools/short_recipe_study.py, README).
QUICKSTART = RECIPE.replace(
    data_root="data/toy_cityscapes",
    generate_toy=True,
    crop_size=(128, 256),
    scale_range=(0.5, 1.5),
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

# The recipes of the published COCO-Stuff 164k and ADE20K weights (model_final_v2_coco.pth: 30.49
# ss / 31.81 msf; model_final_v2_ade20k.pth: 32.53 ss): the published Cityscapes recipe with weight
# decay 1e-4, 640x640 crops and 16 images per iteration (8 GPUs x 2), evaluated with sliding
# 640x640 crops; ADE20K images are first resized to a short side of 640.
COCO = for_dataset(
    PUBLISHED, "coco-stuff",
    data_root="data/coco",
    crop_size=(640, 640),
    scale_range=(0.75, 2.0),
    max_iter=180_000,
    weight_decay=1e-4,
    eval_modes=("ss", "msf"),
    eval_crop_size=(640, 640),
    eval_short_side=None,
)
ADE20K = for_dataset(
    PUBLISHED, "ade20k",
    data_root="data/ADEChallengeData2016",
    crop_size=(640, 640),
    scale_range=(0.5, 2.0),
    max_iter=160_000,
    weight_decay=1e-4,
    eval_modes=("ss", "msf"),
    eval_crop_size=(640, 640),
    eval_short_side=640,
)

# The paper's CamVid setting (section 4: 72.4 mIoU on the test split, from scratch): the
# Cityscapes recipe's optimiser with 10k iterations of 960x720 crops, evaluated on the full
# 960x720 frames. The paper trains on train + val; this recipe trains on train and evaluates val.
CAMVID = for_dataset(
    RECIPE, "camvid",
    data_root="data/camvid",
    crop_size=(720, 960),
    scale_range=(0.75, 2.0),
    max_iter=10_000,
    eval_modes=("ss",),
    eval_crop_size=(720, 960),
    eval_short_side=None,
)

PRESETS = {"quickstart": QUICKSTART, "published": PUBLISHED, "coco": COCO, "ade20k": ADE20K,
           "camvid": CAMVID}

if __name__ == "__main__":
    main(RECIPE, description=__doc__, presets=PRESETS)
