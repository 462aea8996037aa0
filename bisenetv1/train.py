"""Train BiSeNetV1 (Yu et al., ECCV 2018) on Cityscapes or your own data.

    python bisenetv1/train.py                                  # one process: a GPU, else the CPU
    torchrun --nproc_per_node=2 bisenetv1/train.py             # the seed's two-GPU set-up
    torchrun --nproc_per_node=4 bisenetv1/train.py --recipe coco   # also: ade20k, camvid
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from lib.training.config import TrainConfig, for_dataset
from lib.training.trainer import main

# The recipe of the seed (78.45 mIoU, multi-scale-flip crops) and of the published
# model_final_v1_city_new.pth (75.44 ss / 76.94 ssc / 77.45 msf / 78.86 mscf): 8 images on each
# of 2 GPUs, 1024x1024 crops of images rescaled in (0.75, 2.0), SGD lr 1e-2 with 10x on the fusion
# module and the heads, 80k iterations, OHEM on the main and both auxiliary outputs, ResNet-18
# from ImageNet. The published weights were trained with fp16 autocast (`--fp16`), the seed in
# fp32. Training ends with the seed's two numbers: single scale and multi-scale-flip crops.
RECIPE = TrainConfig(
    model="bisenetv1",
    pretrained="auto",
    crop_size=(1024, 1024),
    scale_range=(0.75, 2.0),
    max_iter=80_000,
    batch_size=16,
    lr=1e-2,
    head_lr_mult=10.0,
    warmup_iter=1000,
    eval_modes=("ss", "mscf"),
)

# The recipes of the published COCO-Stuff 164k and ADE20K weights (model_final_v1_coco_new.pth:
# 31.49 ss / 32.46 msf; model_final_v1_ade20k.pth: 36.15 ss): 512x512 crops of images rescaled in
# (0.5, 2.0), weight decay 1e-4, 16 images per iteration, fp16 and SyncBatchNorm, evaluated with
# sliding 512x512 crops; ADE20K images are first resized to a short side of 512. COCO-Stuff: lr
# 1e-2 for 90k iterations (4 GPUs x 4); ADE20K: lr 4e-2 for 40k iterations (2 GPUs x 8).
COCO = for_dataset(
    RECIPE, "coco-stuff",
    data_root="data/coco",
    crop_size=(512, 512),
    scale_range=(0.5, 2.0),
    max_iter=90_000,
    lr=1e-2,
    weight_decay=1e-4,
    fp16=True,
    sync_bn=True,
    eval_modes=("ss", "msf"),
    eval_crop_size=(512, 512),
    eval_short_side=None,
)
ADE20K = for_dataset(
    COCO, "ade20k", eval_crop_size=(512, 512), eval_short_side=512,
    data_root="data/ADEChallengeData2016",
    max_iter=40_000,
    lr=4e-2,
)

# The paper's CamVid setting (ResNet-18: 68.7 mIoU on the test split): its training details (SGD
# lr 2.5e-2, weight decay 1e-4, 16 images, poly decay) on 960x720 crops, evaluated on the full
# 960x720 frames; the paper gives no iteration count for CamVid, 10k is BiSeNetV2's. The paper
# trains on train + val; this recipe trains on train and evaluates val.
CAMVID = for_dataset(
    RECIPE, "camvid",
    data_root="data/camvid",
    crop_size=(720, 960),
    max_iter=10_000,
    lr=2.5e-2,
    weight_decay=1e-4,
    eval_modes=("ss",),
    eval_crop_size=(720, 960),
    eval_short_side=None,
)

PRESETS = {"coco": COCO, "ade20k": ADE20K, "camvid": CAMVID}

if __name__ == "__main__":
    main(RECIPE, description=__doc__, presets=PRESETS)
