"""A DDP training-step worker for tests/test_cuda.py, launched by torchrun with 2 processes.

Each rank trains ``ITERATIONS`` steps on its half of a global batch of ``GLOBAL_BATCH`` with the
trainer's step (``step_losses``, GradScaler with fp16), DDP and synchronised BatchNorm, and rank 0
writes the per-rank losses and its final state dict to ``--out``.

``--device cuda``: both ranks on GPU 0, so that it runs on a one-GPU machine. NCCL refuses two
ranks on one device, so the process group is gloo, which moves CUDA tensors through the host;
``nn.SyncBatchNorm``, DDP, autocast and the GradScaler run their CUDA code unchanged.
``--device cpu``: fp32 with lib/training/sync_batchnorm.py, the trainer's CPU path (a dry run of the
same comparison on a machine without a GPU).

The test computes the same training in one process on the CPU in float32 (BatchNorm over the
whole batch = synchronised BatchNorm; the mean of the ranks' losses = DDP's averaged gradients).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from lib.models.zoo import build_model  # noqa: E402
from lib.training.loss import OhemCrossEntropy  # noqa: E402
from lib.training.optim import build_optimizer  # noqa: E402
from lib.training.step import (  # noqa: E402
    autocast_context,  # noqa: E402
    compile_for_training,
    step_losses,
    to_memory_format,
    without_dropout,
)
from lib.training.sync_batchnorm import convert_sync_batchnorm  # noqa: E402

GLOBAL_BATCH = 4
SIZE = (64, 128)
ITERATIONS = 3
LR = 1e-3
N_CLASSES = 19
# A GradScaler starting at 2**16 skips the first steps on overflow, which fp32 never does; from
# 256 no step is skipped here (checked), so the runs compare step by step.
INIT_SCALE = 256.0


class TinySegNet(nn.Module):
    """Two conv-BN-ReLU stages and two heads upsampled to the input size: BatchNorm layers for
    SyncBN to replace and several outputs like BiSeNet, but compiled in seconds."""

    output_names = ("out", "aux")

    def __init__(self, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU())
        self.head = nn.Conv2d(32, n_classes, 1)
        self.aux = nn.Conv2d(16, n_classes, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[-2:]
        stem = self.stem(x)
        out = F.interpolate(self.head(self.body(stem)), size, mode="bilinear")
        return out, F.interpolate(self.aux(stem), size, mode="bilinear")


def initial_model(name: str) -> nn.Module:
    """The same initial weights in every process (seeded, built on the CPU), without dropout
    (its masks depend on the memory layout and on compilation)."""
    torch.manual_seed(0)
    if name == "tiny":
        return TinySegNet().train()
    return without_dropout(build_model(name, N_CLASSES, aux_heads=True)).train()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches; a per-image offset makes each rank's half differ in its statistics, so
    that per-rank BatchNorm would give other results than synchronised BatchNorm."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(ITERATIONS):
        images = (torch.randn(GLOBAL_BATCH, 3, *SIZE, generator=gen)
                  + 2 * torch.randn(GLOBAL_BATCH, 3, 1, 1, generator=gen))
        labels = torch.randint(0, N_CLASSES, (GLOBAL_BATCH, *SIZE), generator=gen)
        labels[:, :8] = 255
        out.append((images, labels))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="bisenetv2")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    on_cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
        # true float32 convolutions, as in the float32 reference
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model = initial_model(args.model).to(device)
    model = (nn.SyncBatchNorm.convert_sync_batchnorm(model) if on_cuda
             else convert_sync_batchnorm(model))
    model = to_memory_format(model, on_cuda)
    ddp = DistributedDataParallel(model, device_ids=[0] if on_cuda else None,
                                  gradient_as_bucket_view=True)
    net = compile_for_training(ddp) if args.compile else ddp
    optimizer = build_optimizer(model, LR)
    scaler = torch.amp.GradScaler(device.type, init_scale=INIT_SCALE, enabled=on_cuda)
    criterion = OhemCrossEntropy()
    per_rank = GLOBAL_BATCH // world
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    losses = []
    for images, labels in batches():
        images = to_memory_format(images[part].to(device), on_cuda)
        loss, _ = step_losses(net, criterion, images, labels[part].to(device), aux_weight=1.0,
                              autocast=autocast_context(device, on_cuda))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    gathered: list = [None] * world
    dist.all_gather_object(gathered, losses)
    if rank == 0:
        synced = sum(type(m).__name__.startswith("SyncBatchNorm") for m in model.modules())
        torch.save({"losses": gathered, "scale": scaler.get_scale() if on_cuda else None,
                    "sync_bn_layers": synced,
                    "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
