"""The seed's fp16 recipe: BiSeNetV1 with mixed precision and PyTorch's SyncBatchNorm.

    torchrun --nproc_per_node=2 fp16/train.py

torch.amp autocast + GradScaler replace apex, and torch.nn.SyncBatchNorm replaces in-place ABN;
the model and the trainer are BiSeNetV1's.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bisenetv1.train import RECIPE as V1_RECIPE
from lib.training.trainer import main

RECIPE = V1_RECIPE.replace(fp16=True, sync_bn=True, runs_dir="res/fp16")

if __name__ == "__main__":
    main(RECIPE, description=__doc__)
