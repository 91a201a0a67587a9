#!/usr/bin/python3
"""Tokens per second of dtrain-gpt at one global batch, on the same ranks,
for several layouts: dp 2 (tp 1), tp 2, tp 2 with sequence parallelism, and
pp 2 (1f1b over --microbatches microbatches).

Runs the layouts in turn, ROUNDS times (so that the machine's load falls on
every layout alike), each for STEPS steps without evaluation or checkpoints,
and prints the median tokens_per_s of each run's steps after the first
WARMUP (from the metrics of rank 0), and each layout's ratio to the first
layout's median of medians.

  benchmarks/gpt_layouts.py --data data/fortunes [--ranks 2] [--steps 30] [--rounds 2]
      [--embedding 128] [--layers 4] [--heads 4] [--threads 1] [--microbatches 4]
      [--layouts dp,tp,tp+sp,pp]

The bytes each layout sends per step: benchmarks/gpt_comm_bytes.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {"dp": [], "tp": ["--tp", "2"], "tp+sp": ["--tp", "2", "--sequence-parallel"],
           "pp": ["--pp", "2", "--pp-schedule", "1f1b"]}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "data/fortunes"))
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--embedding", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--layouts", default="dp,tp,tp+sp,pp")
    a = p.parse_args()
    layouts = {name: LAYOUTS[name] for name in a.layouts.split(",")}
    layouts.setdefault("pp", [])
    if "pp" in a.layouts.split(","):
        layouts["pp"] = LAYOUTS["pp"] + ["--microbatches", str(a.microbatches)]
    else:
        del layouts["pp"]
    binary = os.path.join(a.build, "examples/gpt/dtrain-gpt")
    mpirun = os.path.join(ROOT, "scripts/launch/dtrain-mpirun")
    results = {name: [] for name in layouts}
    work = tempfile.mkdtemp(prefix="gpt-layouts-")
    try:
        for r in range(a.rounds):
            for name, extra in layouts.items():
                out = os.path.join(work, f"{name}-{r}")
                cmd = [mpirun, "-n", str(a.ranks), binary, "--train-data", a.data + "/train",
                       "--val-data", "none", "--layers", str(a.layers), "--heads", str(a.heads),
                       "--embedding", str(a.embedding), "--global-batch", str(a.global_batch),
                       "--steps", str(a.steps), "--checkpoint-dir", "none", "--sample-tokens",
                       "0", "--threads", str(a.threads), "--progress", "lines", "--log-every",
                       str(a.steps), "--out", out] + extra
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                with open(os.path.join(out, "metrics", "metrics-rank00000.jsonl")) as f:
                    rates = [json.loads(line)["tokens_per_s"] for line in f
                             if '"kind":"train"' in line]
                median = statistics.median(rates[a.warmup:])
                results[name].append(median)
                print(f"round {r} {name:6s} {median:8.1f} tok/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(next(iter(results.values())))
    first = next(iter(results))
    print(f"\n| layout | tok/s (median of {a.rounds} runs' medians) | runs | vs {first} |")
    print("|---|---|---|---|")
    for name, values in results.items():
        m = statistics.median(values)
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {name} | {m:.0f} | {runs} | {m / base:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
