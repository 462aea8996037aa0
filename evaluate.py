"""Evaluate any BiSeNet checkpoint of this repository, or a published state dict.

    python evaluate.py                                   # res/model_final.pth, single scale
    python evaluate.py --ckpt res/bisenetv2/model_final.pth --mode ss ssc msf mscf
    torchrun --nproc_per_node=2 evaluate.py --ckpt model_final_v2_city.pth --mode msf

The model and class count are read from the checkpoint (or inferred from a bare state dict's keys;
``--model`` overrides), and so are the dataset and its protocol (``--dataset`` overrides).
"""

from lib.evaluation.command import main

if __name__ == "__main__":
    main()
