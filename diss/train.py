"""Train the "diss" variant: BiSeNetV1 whose spatial path is replaced by the ResNet's 1/8 feature.

    torchrun --nproc_per_node=2 diss/train.py
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bisenetv1.train import RECIPE as V1_RECIPE
from lib.training.trainer import main

# Same training tricks as BiSeNetV1; only the network differs.
RECIPE = V1_RECIPE.replace(model="diss")

if __name__ == "__main__":
    main(RECIPE, description=__doc__)
