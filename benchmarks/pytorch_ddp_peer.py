#!/usr/bin/env python3
"""PyTorch's own DistributedDataParallel (Gloo backend): the peer of ddp_perf.

The same models, batches, optimizer (SGD, momentum 0.9), loss, synthetic data
and intra-op threads (1 per rank) as benchmarks/ddp_perf.cpp, timed the same
way (warm-up steps excluded, the slowest rank's mean per step; --repeat R
keeps each row's fastest of R runs). Rows:
  pytorch      plain PyTorch loop on rank 0 alone (no DDP)
  pytorch-ddp  torch.nn.parallel.DistributedDataParallel on all ranks
               (Gloo, bucket_cap_mb 25, the default overlap)
PyTorch's DDP all-reduces inside backward (its hooks wait at the end of
backward), so its `sync` column is 0 and the communication it does not hide
is part of `backward`.

  mpirun -n 2 python3 benchmarks/pytorch_ddp_peer.py --model mlp [--json out.json]

--model gpt is the GPT of examples/gpt (GPT-2's layout: learned positions,
pre-LayerNorm blocks of causal self-attention and a GELU MLP, biases, tied
input and output embeddings; --layers, --heads, --embedding, --context,
--vocab), trained on random token ids with the next-token cross-entropy;
its samples are windows of --context tokens, so tokens/s = samples/s x
context. --optimizer adamw uses AdamW instead of SGD.

Rank and world size come from OMPI_COMM_WORLD_RANK/SIZE (or RANK/WORLD_SIZE);
the rendezvous is MASTER_ADDR (default 127.0.0.1) and MASTER_PORT (default
29517).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def env_int(*names, default):
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


class BasicBlock(nn.Module):
    """CIFAR ResNet block with an option-A (zero-padded identity) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x
        if self.stride != 1 or self.pad:
            identity = x[:, :, :: self.stride, :: self.stride]
            if self.pad:
                identity = F.pad(identity, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + identity)


class ResNet20(nn.Module):
    """The same network as dtrain::resnet::make_resnet("resnet20", ...)."""

    def __init__(self, in_channels=1, num_classes=10, n=3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        layers, cin = [], 16
        for s, cout in enumerate((16, 32, 64)):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (b == 0 and s > 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, c, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.ln2 = nn.LayerNorm(c)
        self.fc = nn.Linear(c, 4 * c)
        self.out = nn.Linear(4 * c, c)

    def attention(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / (c // self.heads) ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        weights = scores.masked_fill(causal, float("-inf")).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, t, c))

    def forward(self, x):
        x = x + self.attention(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Gpt(nn.Module):
    """The GPT of examples/gpt/gpt.h, dense (tp = 1), without dropout."""

    def __init__(self, vocab, layers, heads, c, context):
        super().__init__()
        self.wte = nn.Embedding(vocab, c)
        self.wpe = nn.Parameter(torch.zeros(context, c))
        self.blocks = nn.Sequential(*[Block(c, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(c)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln" not in name:
                std = 0.02 / (2 * layers) ** 0.5 if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe[: ids.shape[1]]
        return self.ln_f(self.blocks(x)) @ self.wte.weight.t()  # the tied output layer


def make_model(name, args=None):
    torch.manual_seed(42)
    if name == "gpt":
        return Gpt(args.vocab, args.layers, args.heads, args.embedding, args.context), None
    if name == "mlp":
        mlp = nn.Sequential(
            nn.Linear(784, 4096), nn.ReLU(),
            nn.Linear(4096, 4096), nn.ReLU(),
            nn.Linear(4096, 4096), nn.ReLU(),
            nn.Linear(4096, 10),
        )
        return mlp, (784,)
    if name == "resnet20":
        return ResNet20(1, 10), (1, 28, 28)
    raise SystemExit(f"pytorch_ddp_peer: unknown --model '{name}' (mlp, resnet20, gpt)")


def train(model, shape, batch, rank, args, ddp=None):
    torch.manual_seed(1000 + rank)
    if shape is None:  # token ids and their next tokens
        inputs = [torch.randint(0, args.vocab, (batch, args.context)) for _ in range(4)]
        targets = [torch.randint(0, args.vocab, (batch, args.context)) for _ in range(4)]
    else:
        inputs = [torch.randn((batch,) + shape) for _ in range(4)]
        targets = [torch.randint(0, 10, (batch,)) for _ in range(4)]
    net = ddp if ddp is not None else model
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    net.train()
    sums = dict(forward=0.0, backward=0.0, sync=0.0, optimizer=0.0, step=0.0)
    for step in range(args.warmup_iters + args.iters):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        t1 = time.perf_counter()
        out = net(inputs[step % 4])
        loss = F.cross_entropy(out.flatten(0, -2), targets[step % 4].flatten())
        t2 = time.perf_counter()
        loss.backward()  # DDP: all-reduces run and are waited for in here
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if step < args.warmup_iters:
            continue
        sums["forward"] += t2 - t1
        sums["backward"] += t3 - t2
        sums["optimizer"] += (t1 - t0) + (t4 - t3)
        sums["step"] += t4 - t0
    return {k: v / args.iters for k, v in sums.items()}


def slowest(times):
    keys = sorted(times)
    t = torch.tensor([times[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mlp", choices=["mlp", "resnet20", "gpt"])
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--vocab", type=int, default=113, help="gpt: vocabulary size")
    p.add_argument("--layers", type=int, default=4, help="gpt: blocks")
    p.add_argument("--heads", type=int, default=4, help="gpt: attention heads")
    p.add_argument("--embedding", type=int, default=128, help="gpt: embedding size")
    p.add_argument("--context", type=int, default=64, help="gpt: tokens per sample")
    p.add_argument("--global-batch", type=int, default=0)
    p.add_argument("--batch-per-rank", type=int, default=0)
    p.add_argument("-w", "--warmup_iters", type=int, default=3)
    p.add_argument("-n", "--iters", type=int, default=10)
    p.add_argument("-r", "--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="")
    args = p.parse_args()

    rank = env_int("OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK", default=0)
    world = env_int("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE", default=1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    if args.global_batch == 0 and args.batch_per_rank == 0:
        if args.model in ("resnet20", "gpt"):
            args.global_batch = 128 if args.model == "resnet20" else 32
        else:
            args.batch_per_rank = 64
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world} ranks")

    def batch_for(ranks):
        return args.global_batch // ranks if args.global_batch else args.batch_per_rank

    # Plain PyTorch on rank 0 alone (the others wait in a Gloo barrier), then
    # PyTorch DDP on all ranks; --repeat runs both R times, keeping each
    # row's fastest run, as ddp_perf does.
    best = {}
    for _ in range(args.repeat):
        times = dict(forward=0.0, backward=0.0, sync=0.0, optimizer=0.0, step=0.0)
        if rank == 0:
            model, shape = make_model(args.model, args)
            times = train(model, shape, batch_for(1), rank, args)
        dist.barrier()
        runs = [(("pytorch", 1, batch_for(1), "-", 0), slowest(times))]
        model, shape = make_model(args.model, args)
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25)
        times = train(model, shape, batch_for(world), rank, args, ddp)
        del ddp
        runs.append((("pytorch-ddp", world, batch_for(world), "on", 25 << 20), slowest(times)))
        for key, t in runs:
            if key not in best or t["step"] < best[key]["step"]:
                best[key] = t
    rows = [key + (t,) for key, t in best.items()]

    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"# pytorch_ddp_peer  model {args.model} ({params / 1e6:.2f}M parameters)  "
              f"world {world}  warm-up {args.warmup_iters}  iters {args.iters}  "
              f"repeat {args.repeat}  "
              f"threads {torch.get_num_threads()}  torch {torch.__version__} gloo"
              + (f"  tokens per sample {args.context}" if args.model == "gpt" else ""))
        print("# times in ms per step (slowest rank's mean); DDP's all-reduce wait is in backward")
        print(f"{'# row':<11} {'ranks':>5} {'batch':>6} {'overlap':>7} {'bucket':>9} "
              f"{'forward':>9} {'backward':>9} {'sync':>9} {'optim':>9} {'step':>9} "
              f"{'samples/s':>10}")
        out = []
        for name, ranks, batch, overlap, cap, t in rows:
            sps = batch * ranks / t["step"] if t["step"] > 0 else 0.0
            bucket = f"{cap >> 20} MiB" if cap else "-"
            print(f"{name:<11} {ranks:>5} {batch:>6} {overlap:>7} {bucket:>9} "
                  f"{1e3 * t['forward']:>9.1f} {1e3 * t['backward']:>9.1f} {1e3 * t['sync']:>9.1f} "
                  f"{1e3 * t['optimizer']:>9.1f} {1e3 * t['step']:>9.1f} {sps:>10.1f}")
            out.append(dict(name=name, ranks=ranks, batch_per_rank=batch, overlap=overlap,
                            bucket_cap_bytes=cap, samples_per_s=sps,
                            **{f"{k}_ms": 1e3 * v for k, v in t.items()}))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(benchmark="ddp_perf", framework="pytorch", model=args.model,
                               tokens_per_sample=args.context if args.model == "gpt" else 1,
                               parameters=params, world_size=world,
                               warmup=args.warmup_iters, iters=args.iters, repeat=args.repeat,
                               threads=torch.get_num_threads(), torch=torch.__version__,
                               rows=out), f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
