#!/usr/bin/python3
"""Time from a rank's death to training resumed, under dtrain-launch.

Runs dtrain-resnet on RANKS ranks under scripts/launch/dtrain-launch, kills
rank KILL_RANK for real (SIGKILL, DTRAIN_FAULT_KILL) after step KILL_STEP,
and reads the timeline back from the trainer's metrics and the supervisor's
JSON log:

  death        the killed rank's last metrics line (written just before the kill)
  detected     the supervisor logs the failed attempt (mpirun noticed the death)
  relaunched   the supervisor starts the next attempt (after --backoff)
  resumed      the new attempt's first completed training step

  benchmarks/recovery_time.py --data data/fashion-mnist [--ranks 2] [--backoff 1]

The trainer's start-up (MPI, reading the checkpoint, building the model) is
part of relaunched -> resumed.
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "data/fashion-mnist"))
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--kill-step", type=int, default=12)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--backoff", type=float, default=1.0)
    p.add_argument("--model", default="resnet20")
    args = p.parse_args()

    out = tempfile.mkdtemp(prefix="dtrain-recovery-")
    log = os.path.join(out, "launch.jsonl")
    cmd = [os.path.join(ROOT, "scripts/launch/dtrain-launch"), "-n", str(args.ranks),
           "--backoff", str(args.backoff), "--max-restarts", "2", "--log", log, "--",
           os.path.join(args.build, "examples/resnet/dtrain-resnet"), "--model", args.model,
           "--train-data", args.data + "/train", "--test-data", "none", "--steps",
           str(args.steps), "--checkpoint-every", str(args.checkpoint_every), "--out", out,
           "--progress", "lines", "--log-every", "1000"]
    env = dict(os.environ, DTRAIN_FAULT_KILL=f"{args.kill_rank}:{args.kill_step}")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout)
        sys.exit(f"recovery_time: the job failed (exit {proc.returncode})")

    def metrics(rank):
        with open(os.path.join(out, "metrics", f"metrics-rank{rank:05d}.jsonl")) as f:
            return [json.loads(line) for line in f]

    killed = metrics(args.kill_rank)
    runs = [i for i, r in enumerate(killed) if r["kind"] == "run"]
    death = max(r["time"] for r in killed[:runs[1]] if r["kind"] == "train")
    resumed = min(r["time"] for r in killed[runs[1]:] if r["kind"] == "train")
    resumed_from = killed[runs[1]]["resumed_from_step"]
    events = []
    with open(log) as f:
        for line in f:
            e = json.loads(line)
            e["t"] = datetime.datetime.fromisoformat(e["time"]).timestamp()
            events.append(e)
    detected = min(e["t"] for e in events if e["event"] == "failure")
    relaunched = [e["t"] for e in events if e["event"] == "start"][1]

    print(f"# recovery_time  {args.model}  {args.ranks} ranks  rank {args.kill_rank} SIGKILLed "
          f"after step {args.kill_step}  resumed from the step-{resumed_from} checkpoint  "
          f"back-off {args.backoff:g} s")
    print(f"{'phase':34s} {'seconds':>8s} {'since death':>12s}")
    for name, t0, t1 in (("death -> failure detected", death, detected),
                         ("detected -> relaunched (back-off)", detected, relaunched),
                         ("relaunched -> first step done", relaunched, resumed)):
        print(f"{name:34s} {t1 - t0:8.2f} {t1 - death:12.2f}")
    print(f"{'total: death -> training resumed':34s} {resumed - death:8.2f}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
