#!/usr/bin/env python3
"""PyTorch on the GPU: the peer of `dtrain-resnet --device cuda` in the GPU check.

Trains the same network as the trainer (ResNet-20 in the CIFAR layout from
pytorch_ddp_peer.py, or torchvision's ResNet-50, which is the layout of
dtrain's resnet50) on the same data set directory (dtrain-data format, read
with h5py into host memory once), for the same time, with the trainer's
settings: SGD with momentum 0.9 and Nesterov, weight decay 5e-4, float32,
no augmentation, uint8 images copied to the GPU and normalized there, one
loss.item() per step (the trainer reads the step's loss every step too).
Batches are gathered into pinned memory and copied to the GPU while it
computes the step before (pin_memory + non_blocking, as a DataLoader with
pin_memory=True feeds a loop); the trainer's loader prepares them in its
worker threads.
Images/s is counted from the step after the warm-up to the last step, on
the wall clock, so it includes every wait.

  python3 benchmarks/pytorch_gpu_peer.py --model resnet20 --data DIR --batch-per-rank 512 \\
      --seconds 60 [--json out.json]
  mpirun -n 4 python3 benchmarks/pytorch_gpu_peer.py ...      # DDP over NCCL, a GPU per rank

Rank and world size come from OMPI_COMM_WORLD_RANK/SIZE (or RANK/WORLD_SIZE);
the GPU is the local rank; the rendezvous is MASTER_ADDR/MASTER_PORT.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_ddp_peer import ResNet20, env_int  # noqa: E402  (the same network as dtrain's)


def load_dataset(directory):
    """Images (uint8, N x C x H x W), labels (int64) and the normalization of a data set."""
    import h5py

    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    images, labels = [], []
    for shard in manifest["shards"]:
        with h5py.File(os.path.join(directory, shard["file"]), "r") as h5:
            images.append(h5["images"][...])
            labels.append(h5["labels"][...])
    x = torch.from_numpy(np.concatenate(images))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    y = torch.from_numpy(np.concatenate(labels).astype(np.int64))
    classes = len(manifest.get("class_names", [])) or int(y.max()) + 1
    return x, y, classes


def make_model(name, channels, classes):
    torch.manual_seed(0)
    if name == "resnet20":
        return ResNet20(channels, classes)
    if name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50(num_classes=classes)
        if channels != 3:
            model.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        return model
    raise SystemExit(f"pytorch_gpu_peer: unknown --model '{name}' (resnet20, resnet50)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet50"])
    p.add_argument("--data", required=True, help="data set directory (dtrain-data format)")
    p.add_argument("--batch-per-rank", type=int, default=256)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--json", default="")
    args = p.parse_args()

    rank = env_int("OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK", default=0)
    world = env_int("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE", default=1)
    local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK", default=0)
    if not torch.cuda.is_available():
        raise SystemExit("pytorch_gpu_peer: this PyTorch sees no CUDA device")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29518")
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)

    images, labels, classes = load_dataset(args.data)
    channels = images.shape[1]
    # dtrain-resnet's normalization (Fashion-MNIST's mean and std, for every data set):
    # value * (1/255/std) + (-mean/std), in float32 on the GPU.
    mean, std = 0.2860, 0.3530
    scale, shift = 1.0 / 255.0 / std, -mean / std
    model = make_model(args.model, channels, classes).to(device)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank]) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    net.train()

    generator = torch.Generator().manual_seed(1000 + rank)
    order = torch.randperm(images.shape[0], generator=generator)
    cursor = 0
    # The usual pin_memory + non_blocking pattern: the next batch is gathered
    # into one of two pinned buffers and copied while the GPU computes.
    pinned = [(torch.empty((args.batch_per_rank,) + tuple(images.shape[1:]), dtype=images.dtype).pin_memory(),
               torch.empty((args.batch_per_rank,), dtype=labels.dtype).pin_memory()) for _ in range(2)]

    def stage(slot):
        nonlocal order, cursor
        if cursor + args.batch_per_rank > order.numel():
            order = torch.randperm(images.shape[0], generator=generator)
            cursor = 0
        index = order[cursor:cursor + args.batch_per_rank]
        cursor += args.batch_per_rank
        x_host, y_host = pinned[slot]
        torch.index_select(images, 0, index, out=x_host)
        torch.index_select(labels, 0, index, out=y_host)
        x = x_host.to(device, non_blocking=True).float().mul_(scale).add_(shift)
        return x, y_host.to(device, non_blocking=True)

    steps = 0
    t_start = None
    deadline = time.perf_counter() + args.seconds
    x, y = stage(0)
    while True:
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        x, y = stage((steps + 1) % 2)  # the buffer of two steps ago: its copy is done
        loss_value = loss.item()  # one host sync per step, as the trainer's
        steps += 1
        now = time.perf_counter()
        if steps == args.warmup_steps:
            t_start = now
        stop = torch.tensor([1.0 if now > deadline else 0.0], device=device)
        if world > 1:
            dist.all_reduce(stop)
        if stop.item() > 0:
            break
    timed = steps - args.warmup_steps
    if t_start is None or timed <= 0:
        raise SystemExit(f"pytorch_gpu_peer: only {steps} steps in {args.seconds} s; "
                         f"raise --seconds above the {args.warmup_steps} warm-up steps")
    elapsed = time.perf_counter() - t_start
    images_per_s = timed * args.batch_per_rank * world / elapsed
    if rank == 0:
        info = dict(framework="pytorch", torch=torch.__version__,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    cudnn_benchmark=torch.backends.cudnn.benchmark,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    gpu=torch.cuda.get_device_name(device), model=args.model, ranks=world,
                    batch_per_rank=args.batch_per_rank, steps=steps, timed_steps=timed,
                    seconds=elapsed, images_per_s=images_per_s, last_loss=loss_value,
                    max_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30)
        print(f"pytorch {args.model}: {world} rank(s) x batch {args.batch_per_rank}, "
              f"{timed} timed steps in {elapsed:.1f} s: {images_per_s:.1f} images/s "
              f"(loss {loss_value:.3f}, torch {torch.__version__})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(info, f, indent=2)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
