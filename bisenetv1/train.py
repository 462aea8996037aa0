"""Train BiSeNetV1 (Yu et al., ECCV 2018) on Cityscapes or your own data.

    python bisenetv1/train.py                                  # one process: a GPU, else the CPU
    torchrun --nproc_per_node=2 bisenetv1/train.py             # the seed's two-GPU set-up
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from lib.config import TrainConfig  # noqa: E402
from lib.trainer import main  # noqa: E402

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

if __name__ == "__main__":
    main(RECIPE, description=__doc__)
