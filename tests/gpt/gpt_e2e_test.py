#!/usr/bin/python3
"""dtrain-gpt end to end on 2 ranks, on a small text converted by
dtrain-data convert-text: a run at tp 2 with sequence parallelism reports
the unigram baseline, training and validation loss in bits and a text
sample, and writes checkpoints; a second run at tp 1 (dp 2) resumes from
the tp 2 checkpoint and finishes; a third at pp 2 (1f1b, 2 microbatches)
resumes from that one, trains and prints a sample from the stages' weights;
SIGTERM under dtrain-launch stops a tp 2 run with a checkpoint of its last
step and exit 75; bad sizes (heads, context, a --pp that does not divide
the blocks or the ranks, too few microbatches for zb-h1) exit 2 naming the
numbers, before anything is written.

    gpt_e2e_test.py MPIEXEC DTRAIN_GPT DTRAIN_DATA WORK DTRAIN_LAUNCH
"""
import os
import json
import re
import shutil
import signal
import subprocess
import sys
import time

MPIEXEC, GPT, DATA_TOOL, WORK, LAUNCH = sys.argv[1:6]


def fail(message):
    print("FAIL: " + message)
    sys.exit(1)


def run(cmd, timeout=300):
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    print(p.stdout, flush=True)
    return p


def text_source():
    """Fortune-like records (separated by lines of '%'), deterministic."""
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away",
             "quick", "brown", "fox", "jumps", "over", "lazy", "rain", "in", "spain"]
    lines = []
    state = 7
    for _ in range(400):
        n = 4 + state % 6
        record = []
        for _ in range(n):
            state = (state * 1103515245 + 12345) % (1 << 31)
            record.append(words[state % len(words)])
        lines.append(" ".join(record).capitalize() + ".\n%\n")
    path = os.path.join(WORK, "text.txt")
    with open(path, "w") as f:
        f.write("".join(lines))
    return path


def gpt_args(out, data, extra):
    return [GPT, "--train-data", data + "/train", "--val-data", data + "/val", "--layers", "2",
            "--heads", "2", "--embedding", "16", "--context", "16", "--global-batch", "4",
            "--eval-batch", "4", "--val-windows", "8", "--sample-tokens", "40",
            "--checkpoint-every", "3", "--async-checkpoint", "false", "--progress", "lines",
            "--log-every", "3", "--seed", "3", "--out", out] + extra


def gpt(ranks, out, data, extra):
    return run([MPIEXEC, "-n", str(ranks)] + gpt_args(out, data, extra))


def sigterm(data):
    """SIGTERM to the supervisor: the ranks finish their step, save it, exit 75."""
    out = os.path.join(WORK, "sigterm")
    cmd = [LAUNCH, "-n", "2", "--backoff", "0.1", "--"] + gpt_args(
        out, data, ["--tp", "2", "--steps", "100000", "--checkpoint-every", "100000"])
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(out, "metrics", "metrics-rank00000.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) > 6:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    print(output, flush=True)
    if proc.returncode != 75 or "stop requested" not in output:
        fail("exit status %d after SIGTERM, expected 75 and the stop reported" % proc.returncode)
    with open(metrics) as f:
        last = max(json.loads(l)["step"] for l in f if '"train"' in l)
    if "step-%09d" % last not in os.listdir(os.path.join(out, "checkpoints")):
        fail("no checkpoint of the last step run (%d) after SIGTERM" % last)


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    data = os.path.join(WORK, "data")
    p = run([DATA_TOOL, "convert-text", "--source", text_source(), "--out", data,
             "--shards", "1"])
    if p.returncode != 0:
        fail("convert-text failed")
    out = os.path.join(WORK, "run")

    p = gpt(2, out, data, ["--tp", "2", "--sequence-parallel", "--dropout", "0.1",
                           "--steps", "6"])
    if p.returncode != 0:
        fail("the tp 2 run exited %d" % p.returncode)
    for expected in ("unigram baseline on val", "tp 2 with sequence parallelism",
                     "val loss", "bits)", "sample (40 tokens"):
        if expected not in p.stdout:
            fail("the tp 2 run printed no '%s'" % expected)
    m = re.search(r"eval  step 6  val loss ([0-9.]+) \(([0-9.]+) bits\)", p.stdout)
    if not m or abs(float(m.group(1)) / 0.6931471805599453 - float(m.group(2))) > 1e-3:
        fail("no evaluation line at step 6 with the loss in bits")
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    if "step-000000006" not in ckpts:
        fail("no checkpoint step 6: %s" % ckpts)

    p = gpt(2, out, data, ["--tp", "1", "--dropout", "0.1", "--steps", "9"])
    if p.returncode != 0:
        fail("the tp 1 resume exited %d" % p.returncode)
    if "resumed from" not in p.stdout or "step 6" not in p.stdout:
        fail("the tp 1 run did not resume from the tp 2 checkpoint at step 6")
    if "eval  step 9" not in p.stdout or "sample (40 tokens" not in p.stdout:
        fail("the resumed run did not finish at step 9 with a sample")

    p = gpt(2, out, data, ["--pp", "2", "--microbatches", "2", "--pp-schedule", "1f1b",
                           "--dropout", "0.1", "--steps", "12"])
    if p.returncode != 0:
        fail("the pp 2 resume exited %d" % p.returncode)
    if "resumed from" not in p.stdout or "step 9" not in p.stdout or ", pp 2" not in p.stdout:
        fail("the pp 2 run did not resume from the tp 1 checkpoint at step 9")
    m = re.search(r"eval  step 12  val loss ([0-9.]+)", p.stdout)
    if not m or "sample (40 tokens" not in p.stdout:
        fail("the pp 2 run did not finish at step 12 with an evaluation and a sample")

    sigterm(data)

    for extra, message in (
            (["--tp", "2", "--heads", "3", "--embedding", "12"],
             "tensor-parallel size 2 does not divide the number of heads 3"),
            (["--pp", "2", "--layers", "3"],
             "2 pipeline stages do not divide the 3 transformer blocks"),
            (["--pp", "3", "--layers", "3"], "not divisible by tp * pp = 1 * 3 = 3"),
            (["--pp", "2", "--pp-schedule", "zb-h1", "--microbatches", "1"],
             "zb-h1 schedule on 2 pipeline ranks needs at least 2 microbatches"),
            (["--tp", "2", "--sequence-parallel", "--context", "15"],
             "context length 15 is not divisible by the sequence-parallel size 2"),
            (["--pp", "2", "--pp-tied-sum", "token"], "--pp-tied-sum 'token' is not step or microbatch")):
        bad = os.path.join(WORK, "bad")
        p = gpt(2, bad, data, extra + ["--steps", "2"])
        if p.returncode != 2 or message not in p.stdout:
            fail("%s: expected exit 2 and '%s'" % (" ".join(extra), message))
        if os.path.exists(os.path.join(bad, "checkpoints")) and os.listdir(
                os.path.join(bad, "checkpoints")):
            fail("a rejected run wrote checkpoints")
    print("OK")


main()
