#!/usr/bin/python3
"""Fault-injection and end-to-end tests of the trainer, the checkpoints and
dtrain-launch, with real faults: a rank SIGKILLed at a step, a rank killed
while a checkpoint is being written, flipped bytes in the newest checkpoint,
every other kind of damage to it (a truncated or deleted rank file, a garbled
or deleted manifest, leftovers of an interrupted save), a restart on fewer
ranks, a file-size limit during a save, and the trainer's bad-input errors
(bad options, bad labels).

    fault_test.py CASE        (see CASES at the bottom)

Environment (set by ctest): DTRAIN_RESNET, DTRAIN_CKPT, DTRAIN_DATA (the
binaries), DTRAIN_LAUNCH (scripts/launch/dtrain-launch), DTRAIN_FAULT_WORK
(a scratch directory; the synthetic data set is made there once).
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

RESNET = os.environ["DTRAIN_RESNET"]
CKPT = os.environ["DTRAIN_CKPT"]
DATA_TOOL = os.environ["DTRAIN_DATA"]
LAUNCH = os.environ["DTRAIN_LAUNCH"]
WORK = os.environ.get("DTRAIN_FAULT_WORK", tempfile.gettempdir() + "/dtrain-fault")

SAMPLES = 768
GLOBAL_BATCH = 32


def fail(message):
    print("FAIL: " + message)
    sys.exit(1)


def data_dir():
    """A small synthetic data set (1x12x12 images, 10 classes), made once."""
    root = os.path.join(WORK, "data")
    os.makedirs(WORK, exist_ok=True)
    with open(os.path.join(WORK, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(root, "test", "manifest.json")):
            shutil.rmtree(root, ignore_errors=True)
            for split, n, seed in (("train", SAMPLES, 1), ("test", 256, 2)):
                subprocess.run([DATA_TOOL, "generate", "--out", os.path.join(root, split),
                                "--samples", str(n), "--shape", "1,12,12", "--classes", "10",
                                "--shards", "2", "--seed", str(seed)],
                               check=True, stdout=subprocess.DEVNULL)
    return root


def trainer_args(out, steps, extra=(), global_batch=GLOBAL_BATCH, eval_batch=64,
                 comm_timeout=60):
    d = data_dir()
    return [RESNET, "--model", "resnet20", "--train-data", d + "/train", "--test-data",
            d + "/test", "--global-batch", str(global_batch), "--eval-batch", str(eval_batch),
            "--steps", str(steps), "--checkpoint-every", "4", "--keep", "10",
            "--schedule", "constant", "--warmup-epochs", "0", "--lr", "0.05", "--seed", "7",
            "--threads", "1", "--loader-workers", "1", "--progress", "lines", "--log-every",
            "4", "--comm-timeout", str(comm_timeout), "--out", out] + list(extra)


def run(cmd, env_extra=None, timeout=300):
    env = dict(os.environ)
    env.update(env_extra or {})
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    print(p.stdout, flush=True)
    return p


def launch(ranks, train_cmd, launch_args=(), env_extra=None, **kw):
    return run([LAUNCH, "-n", str(ranks), "--backoff", "0.1", "--max-restarts", "3"]
               + list(launch_args) + ["--"] + train_cmd, env_extra, **kw)


def fresh(name):
    path = os.path.join(WORK, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


def same_checkpoints(a, b):
    """Bitwise comparison of every tensor of the newest checkpoints."""
    p = run([CKPT, "diff", a, b])
    if p.returncode != 0:
        fail(f"checkpoints differ: {a} vs {b}")


def steps_of(directory):
    return sorted(int(n[5:]) for n in os.listdir(directory)
                  if n.startswith("step-") and os.path.exists(os.path.join(directory, n, "manifest.json")))


def reference(name, steps, ranks=2):
    out = fresh(name)
    p = launch(ranks, trainer_args(out, steps))
    if p.returncode != 0:
        fail("the uninterrupted reference run failed")
    return out


# --- the cases ----------------------------------------------------------------

def case_kill_rank():
    """(a) SIGKILL rank 1 after step 6: restarted, resumed, bitwise identical."""
    ref = reference("kill-ref", 12)
    out = fresh("kill")
    p = launch(2, trainer_args(out, 12), env_extra={"DTRAIN_FAULT_KILL": "1:6"})
    if p.returncode != 0:
        fail("the supervised job did not finish after the kill")
    if "fault injection: SIGKILL after step 6" not in p.stdout:
        fail("the fault was not injected")
    if "resumed from" not in p.stdout or "step 4" not in p.stdout:
        fail("the restarted job did not resume from the step-4 checkpoint")
    same_checkpoints(ref + "/checkpoints", out + "/checkpoints")


def kill_during_save(phase, rank, resumed_step):
    ref = reference(f"save-{phase}-ref", 12)
    out = fresh(f"save-{phase}")
    p = launch(2, trainer_args(out, 12),
               env_extra={"DTRAIN_FAULT_CHECKPOINT": f"{phase}:8:{rank}"})
    if p.returncode != 0:
        fail("the supervised job did not finish after the kill during the save")
    if f"killed while saving step 8 ({phase})" not in p.stdout:
        fail("the fault was not injected")
    if "resumed from" not in p.stdout or f"(step {resumed_step}," not in p.stdout:
        fail(f"the restart did not resume from the step-{resumed_step} checkpoint")
    if any(n.startswith(".tmp-") for n in os.listdir(out + "/checkpoints")):
        fail("a temporary checkpoint directory was left behind")
    same_checkpoints(ref + "/checkpoints", out + "/checkpoints")


def case_kill_during_save():
    """(b) rank 1 killed after writing its file of step 8, before the commit:
    step 8 never becomes a checkpoint; the restart resumes from step 4."""
    kill_during_save("after_write", 1, 4)


def case_kill_before_rename():
    """(b) rank 0 killed with the manifest written (every rank had agreed),
    before the rename: the restart verifies step 8, completes its commit with a
    warning, and resumes from it."""
    kill_during_save("before_rename", 0, 8)


def case_corrupt_newest():
    """(c) flipped bytes in the newest checkpoint: skipped with a warning."""
    ref = reference("corrupt-ref", 16)
    out = fresh("corrupt")
    if launch(2, trainer_args(out, 12)).returncode != 0:
        fail("the first run failed")
    damage_flip(os.path.join(out, "checkpoints", "step-000000012"))
    p = launch(2, trainer_args(out, 16))
    if p.returncode != 0:
        fail("the run after the corruption failed")
    if "skipping checkpoint" not in p.stdout or "rank-00000.h5" not in p.stdout:
        fail("no warning naming the corrupt file")
    if "(step 8," not in p.stdout:
        fail("did not fall back to the step-8 checkpoint")
    same_checkpoints(ref + "/checkpoints", out + "/checkpoints")


def damage_flip(ckpt):
    bad = os.path.join(ckpt, "rank-00000.h5")
    size = os.path.getsize(bad)
    with open(bad, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def damage_truncate(ckpt):
    bad = os.path.join(ckpt, "rank-00001.h5")
    os.truncate(bad, os.path.getsize(bad) // 2)


def damage_garble(ckpt):
    with open(os.path.join(ckpt, "manifest.json"), "w") as f:
        f.write("{ not json")


# (name, damage of the newest checkpoint (step 12), what verify and the
# resume's warning must name, the verify exit status, the step resumed from)
DAMAGES = [
    ("flipped-byte", damage_flip, ["rank-00000.h5"], 1, 8),
    ("truncated-file", damage_truncate, ["rank-00001.h5"], 1, 8),
    ("deleted-file", lambda c: os.remove(os.path.join(c, "rank-00000.h5")), ["rank-00000.h5"],
     1, 8),
    ("garbled-manifest", damage_garble, ["step-000000012", "manifest.json"], 1, 8),
    ("deleted-manifest", lambda c: os.remove(os.path.join(c, "manifest.json")),
     ["step-000000012", "no manifest.json"], 1, 8),
    # Not a checkpoint at all: an interrupted save of step 16, removed on start.
    ("tmp-leftover", lambda c: shutil.copytree(c, os.path.join(os.path.dirname(c),
                                                               ".tmp-step-000000016"),
                                               ignore=shutil.ignore_patterns("manifest.json")),
     [".tmp-step-000000016", "interrupted save"], 0, 12),
]


def case_damaged_checkpoints():
    """Each kind of damage to the newest checkpoint: `dtrain-ckpt verify`
    fails naming what is wrong, and the trainer warns naming it and resumes
    from the checkpoint before (a .tmp leftover is no checkpoint: removed
    with a warning, verify passes)."""
    source = fresh("damaged-source")
    if launch(2, trainer_args(source, 12)).returncode != 0:
        fail("the run that writes the checkpoints failed")
    if steps_of(source + "/checkpoints") != [4, 8, 12]:
        fail(f"checkpoints: {steps_of(source + '/checkpoints')}")
    for name, damage, needles, verify_status, resumed in DAMAGES:
        out = fresh("damaged-" + name)
        shutil.copytree(source + "/checkpoints", out + "/checkpoints")
        damage(os.path.join(out, "checkpoints", "step-000000012"))
        p = run([CKPT, "verify", out + "/checkpoints"])
        if p.returncode != verify_status:
            fail(f"{name}: dtrain-ckpt verify exited {p.returncode}, expected {verify_status}")
        if verify_status != 0 and not all(n in p.stdout for n in needles):
            fail(f"{name}: dtrain-ckpt verify does not name {needles}")
        # One rank resumes what two wrote; --steps 8: nothing more to train.
        p = run(trainer_args(out, 8, ["--test-data", "none"]))
        if p.returncode != 0:
            fail(f"{name}: the resumed run failed")
        warnings = [line for line in p.stdout.splitlines() if "warning" in line]
        if not any(all(n in line for n in needles) for line in warnings):
            fail(f"{name}: no warning naming {needles}")
        if f"step-{resumed:09d} (step {resumed}," not in p.stdout:
            fail(f"{name}: did not resume from step {resumed}")
    p = run([CKPT, "list", out + "/checkpoints"])
    if p.returncode != 0 or "step-000000012" not in p.stdout:
        fail("dtrain-ckpt list does not show the checkpoints")
    if run([CKPT, "verify", "--frobnicate", out]).returncode != 2:
        fail("dtrain-ckpt with an unknown option did not exit 2")
    print(f"ok: {len(DAMAGES)} kinds of damage")


def case_fewer_ranks():
    """(d) a rank that keeps dying on 4 ranks: restart on 2, same global
    batch, every sample of the epoch exactly once."""
    out = fresh("shrink")
    steps = SAMPLES // GLOBAL_BATCH  # one epoch
    log = os.path.join(out, "samples")
    p = launch(4, trainer_args(out, steps, ["--sample-log", log]),
               launch_args=["--min-ranks", "2", "--shrink-after", "1", "--batch-divisor",
                            str(GLOBAL_BATCH)],
               env_extra={"DTRAIN_FAULT_KILL": "3:6:always"})
    if p.returncode != 0:
        fail("the job did not finish on fewer ranks")
    audit_epoch(out, steps, GLOBAL_BATCH, final_world=2)
    print(f"ok: one epoch on 4 then 2 ranks, all {SAMPLES} samples exactly once")


def audit_epoch(out, steps, global_batch, final_world):
    """From the --sample-log files in `out`: the last attempt ran on
    `final_world` ranks, and the steps that count (for each step, the last
    attempt that ran it) used each of the SAMPLES samples exactly once, in
    global batches of `global_batch`."""
    records = []
    for name in sorted(os.listdir(out)):
        if name.startswith("samples-rank"):
            with open(os.path.join(out, name)) as f:
                records += [json.loads(line) for line in f]
    world = max(records, key=lambda r: (r["restart"], r["step"]))["world_size"]
    if world != final_world:
        fail(f"the last attempt ran on {world} ranks, expected {final_world}")
    # For each step, the records of the last attempt that ran it.
    last = {}
    for r in records:
        key = r["step"]
        if key not in last or r["restart"] > last[key][0]:
            last[key] = (r["restart"], [])
        if r["restart"] == last[key][0]:
            last[key][1].append(r)
    if sorted(last) != list(range(1, steps + 1)):
        fail(f"steps run: {sorted(last)}")
    seen = []
    for step, (_, recs) in sorted(last.items()):
        batch = [i for r in sorted(recs, key=lambda r: r["rank"]) for i in r["indices"]]
        if len(batch) != global_batch:
            fail(f"step {step} used {len(batch)} samples, not the global batch {global_batch}")
        seen += batch
    if sorted(seen) != list(range(SAMPLES)):
        dup = len(seen) - len(set(seen))
        fail(f"the epoch repeated {dup} and skipped {SAMPLES - len(set(seen))} samples")


def case_disk_full():
    """(e) a file-size limit (EFBIG, as on a full disk) during a save: a clear
    error, and the previous checkpoints untouched."""
    out = fresh("diskfull")
    if launch(2, trainer_args(out, 8)).returncode != 0:
        fail("the first run failed")
    before = steps_of(out + "/checkpoints")
    mpirun = os.path.join(os.path.dirname(LAUNCH), "dtrain-mpirun")
    p = run([mpirun, "-n", "2"] + trainer_args(out, 16),
            env_extra={"DTRAIN_FAULT_FILE_LIMIT_KIB": "256"})
    if p.returncode == 0:
        fail("the run with a 256 KiB file-size limit succeeded")
    if "was not saved" not in p.stdout or "previous checkpoints are untouched" not in p.stdout:
        fail("no clear error about the failed save")
    if steps_of(out + "/checkpoints") != before:
        fail(f"checkpoints changed: {before} -> {steps_of(out + '/checkpoints')}")
    if run([CKPT, "verify", out + "/checkpoints"]).returncode != 0:
        fail("the previous checkpoints no longer verify")


def case_e2e_resume():
    """A few steps under mpirun, a checkpoint, then a resume that continues."""
    out = fresh("e2e")
    mpirun = os.path.join(os.path.dirname(LAUNCH), "dtrain-mpirun")
    p = run([mpirun, "-n", "2"] + trainer_args(out, 4, ["--trace"]), {"DTRAIN_MALLOC_TUNING": "1"})
    if p.returncode != 0 or "test accuracy" not in p.stdout:
        fail("the first run did not finish with an evaluation")
    if steps_of(out + "/checkpoints") != [4]:
        fail(f"checkpoints: {steps_of(out + '/checkpoints')}")
    p = run([mpirun, "-n", "2"] + trainer_args(out, 8), {"DTRAIN_MALLOC_TUNING": "0"})
    if p.returncode != 0 or "resuming at step 4" not in p.stdout:
        fail("the second run did not resume at step 4")
    with open(out + "/metrics/metrics-rank00001.jsonl") as f:
        lines = [json.loads(line) for line in f]
    train_steps = [r["step"] for r in lines if r["kind"] == "train"]
    if train_steps != list(range(1, 9)):
        fail(f"train steps logged: {train_steps}")
    tuned = [r.get("malloc_tuning") for r in lines if r["kind"] == "run"]
    if tuned != [True, False]:
        fail(f"malloc_tuning of the runs with DTRAIN_MALLOC_TUNING=1, then 0: {tuned}")
    for key in ("loss", "accuracy", "lr", "images_per_s", "forward_s", "backward_s",
                "optimizer_s", "comm_exposed_s", "data_wait_s", "rank", "epoch"):
        if key not in lines[-2] and key not in lines[-3]:
            fail(f"metrics lack '{key}'")
    with open(out + "/trace/trace-rank00000.json") as f:
        names = {e["name"] for e in json.load(f)["traceEvents"]}
    for name in ("forward", "backward", "optimizer", "data wait", "allreduce bucket 0",
                 "checkpoint save", "eval"):
        if name not in names:
            fail(f"the trace has no '{name}' event")


def case_sigterm():
    """A clean stop: SIGTERM to the supervisor reaches the ranks, which finish
    their step, save a checkpoint and exit 75; the next run resumes there."""
    import signal
    import time
    out = fresh("sigterm")
    cmd = [LAUNCH, "-n", "2", "--backoff", "0.1", "--"] + trainer_args(out, 100000)
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
    print(output)
    if proc.returncode != 75:
        fail(f"exit status {proc.returncode} after SIGTERM, expected 75")
    if "stop requested" not in output:
        fail("the trainer did not report the stop")
    saved = steps_of(out + "/checkpoints")
    if not saved:
        fail("no checkpoint was saved on the stop")
    with open(metrics) as f:
        last_step = max(json.loads(l)["step"] for l in f if '"train"' in l)
    if saved[-1] != last_step:
        fail(f"the stop saved step {saved[-1]}, but the last step run was {last_step}")
    p = launch(2, trainer_args(out, last_step + 2))
    if p.returncode != 0 or f"resuming at step {last_step}" not in p.stdout:
        fail("the next run did not resume where the stop saved")


def expect_bad_input(args, message, ranks=1, name="bad", env_extra=None):
    out = fresh(name)
    cmd = ([os.path.join(os.path.dirname(LAUNCH), "dtrain-mpirun"), "-n", str(ranks)]
           if ranks > 1 else [])
    p = run(cmd + args, env_extra)
    if p.returncode != 2 and not (ranks > 1 and p.returncode != 0):
        fail(f"exit status {p.returncode}, expected 2, for: {' '.join(args)}")
    messages = [message] if isinstance(message, str) else message
    for m in messages:
        if m not in p.stdout:
            fail(f"the message lacks '{m}'")
    for written in ("metrics", "checkpoints"):
        if os.path.exists(os.path.join(out, written)):
            fail(f"{written}/ was written before the input was checked")


def relabelled(name, transform, dtype=None, keep_range=True):
    """A copy of the synthetic training split whose labels are transform(labels),
    stored as `dtype` (default: as they were), with the manifest updated to
    match (sizes, digests, dtype; the recorded range unless keep_range is
    False, as in a data set written before the range was recorded)."""
    import h5py
    import numpy
    path = fresh(name)
    shutil.copytree(data_dir() + "/train", path)
    with open(path + "/manifest.json") as f:
        manifest = json.load(f)
    values = []
    for shard in manifest["shards"]:
        file = os.path.join(path, shard["file"])
        with h5py.File(file, "r+") as h5:
            labels = transform(h5["labels"][...])
            del h5["labels"]
            h5.create_dataset("labels", data=labels.astype(dtype or labels.dtype),
                              chunks=(len(labels),))
            values.append(labels)
        shard["bytes"] = os.path.getsize(file)
        with open(file, "rb") as f:
            shard["sha256"] = hashlib.sha256(f.read()).hexdigest()
    everything = numpy.concatenate(values)
    for field in manifest["fields"]:
        if field["name"] == "labels":
            field.pop("min", None)
            field.pop("max", None)
            if dtype:
                field["dtype"] = numpy.dtype(dtype).name
            if keep_range and not dtype:
                field["min"], field["max"] = int(everything.min()), int(everything.max())
    with open(path + "/manifest.json", "w") as f:
        json.dump(manifest, f, indent=2)
    return path


def case_bad_input():
    """The trainer's bad-input errors: non-zero exit before any training or writing."""
    d = data_dir()
    out = os.path.join(WORK, "bad")
    base = trainer_args(out, 4)
    expect_bad_input(base + ["--model", "resnet99"], "unknown --model 'resnet99'")
    expect_bad_input(base + ["--train-data", WORK + "/no-such-dir"], "no-such-dir")
    broken = fresh("broken-data")
    shutil.copytree(d + "/train", broken)
    with open(broken + "/manifest.json", "w") as f:
        f.write("{ not json")
    expect_bad_input(base + ["--train-data", broken], "manifest.json")
    expect_bad_input(base + ["--global-batch", "33"], "not divisible by the number of data-parallel ranks",
                     ranks=2)
    blocker = os.path.join(WORK, "a-file")
    with open(blocker, "w") as f:
        f.write("x")
    expect_bad_input(base + ["--checkpoint-dir", blocker + "/ckpt"], "a-file/ckpt")
    expect_bad_input(base + ["--device", "cuda"], "--device cuda")
    expect_bad_input(base + ["--optimizer", "lamb"], "unknown --optimizer")
    expect_bad_input(base + ["--loader-output", "half"], "unknown --loader-output 'half'")
    expect_bad_input(base + ["--epochs"], "epochs")
    expect_bad_input(base, "DTRAIN_MALLOC_TUNING='yes' is not 0 or 1",
                     env_extra={"DTRAIN_MALLOC_TUNING": "yes"})
    # Labels the model cannot use: caught when the data set is opened, before
    # anything is written (not at the first step, or by the loader).
    floats = relabelled("float-labels", lambda l: l, dtype="float32")
    expect_bad_input(base + ["--train-data", floats], ["label field 'labels'", "float32"])
    shifted = relabelled("shifted-labels", lambda l: l + 10)
    expect_bad_input(base + ["--train-data", shifted],
                     ["label field 'labels'", "from 10 to 19", "[0, 10)"])
    # The same in a data set written before the range was recorded: read once.
    unrecorded = relabelled("shifted-labels-no-range", lambda l: l + 10, keep_range=False)
    expect_bad_input(base + ["--train-data", unrecorded],
                     ["label field 'labels'", "from 10 to 19", "[0, 10)"])
    expect_bad_input(base + ["--test-data", shifted], ["label field 'labels'", shifted],
                     ranks=2)
    # Boolean options: `--resume false` as well as `--resume=false`; a value
    # that does not parse names its option.
    expect_bad_input(base + ["--max-minutes", "soon"], "--max-minutes: cannot parse 'soon'")
    expect_bad_input(base + ["--resume=maybe"], "--resume: cannot parse 'maybe'")
    expect_bad_input(base + ["--resume", "false", "extra"], "unexpected argument 'extra'")


def case_loader_output():
    """Raw uint8 batches normalized on the device train bitwise like float batches."""
    mpirun = os.path.join(os.path.dirname(LAUNCH), "dtrain-mpirun")
    runs = []
    for output in ("float", "raw"):
        out = fresh("loader-output-" + output)
        p = run([mpirun, "-n", "2"] + trainer_args(out, 4, ["--loader-output", output]))
        if p.returncode != 0 or "test accuracy" not in p.stdout:
            fail(f"the run with --loader-output {output} failed")
        runs.append((out, p.stdout))
    same_checkpoints(runs[0][0] + "/checkpoints", runs[1][0] + "/checkpoints")
    evals = [[line[line.index("test loss"):] for line in text.splitlines() if "test loss" in line]
             for _, text in runs]
    if not evals[0] or evals[0] != evals[1]:
        fail(f"the evaluations differ: {evals}")


# --- pipeline parallelism -------------------------------------------------------

PP = ["--pp", "2", "--microbatches", "4", "--pp-schedule", "1f1b"]


def case_pp_kill_rank():
    """SIGKILL the last stage's rank of a pp 2 job after step 6: restarted,
    resumed from step 4, bitwise identical to the uninterrupted run."""
    ref = fresh("pp-kill-ref")
    if launch(2, trainer_args(ref, 12, PP)).returncode != 0:
        fail("the uninterrupted pp 2 run failed")
    out = fresh("pp-kill")
    p = launch(2, trainer_args(out, 12, PP), env_extra={"DTRAIN_FAULT_KILL": "1:6"})
    if p.returncode != 0:
        fail("the supervised pp 2 job did not finish after the kill")
    if "fault injection: SIGKILL after step 6" not in p.stdout:
        fail("the fault was not injected")
    if "resumed from" not in p.stdout or "step 4" not in p.stdout:
        fail("the restarted job did not resume from the step-4 checkpoint")
    if "pipeline 1f1b (pp 2" not in p.stdout:
        fail("the job did not run the pipeline strategy")
    same_checkpoints(ref + "/checkpoints", out + "/checkpoints")


def case_pp_resplit():
    """A checkpoint of pp 2 resumes as pp 1 (gradient accumulation over the
    same 4 microbatches) and as plain DDP, and a DDP checkpoint resumes at
    pp 2: the names are those of the whole model. On 4 ranks (dp 2 x pp 2),
    a run with ZeRO-1 per stage (--zero) resumes."""
    mpirun = os.path.join(os.path.dirname(LAUNCH), "dtrain-mpirun")
    for name, ranks, first, second in (("pp-to-pp1", 2, PP, ["--microbatches", "4"]),
                                       ("pp-to-ddp", 2, PP, []),
                                       ("ddp-to-pp", 2, [], PP),
                                       ("pp-zero", 4, PP + ["--zero"], PP + ["--zero"])):
        out = fresh(name)
        if run([mpirun, "-n", str(ranks)] + trainer_args(out, 4, first)).returncode != 0:
            fail(f"{name}: the first run failed")
        p = run([mpirun, "-n", str(ranks)] + trainer_args(out, 8, second))
        if p.returncode != 0 or "resuming at step 4" not in p.stdout:
            fail(f"{name}: the second run did not resume at step 4")
        if 8 not in steps_of(out + "/checkpoints"):
            fail(f"{name}: no checkpoint of step 8")


def case_pp_bad_input():
    """Pipeline options that cannot work: exit 2 (1 rank) or non-zero (2
    ranks) with a message, before anything is written."""
    base = trainer_args(os.path.join(WORK, "bad"), 4)
    expect_bad_input(base + ["--pp", "3"], "is not divisible", ranks=2)
    expect_bad_input(base + ["--pp", "2", "--microbatches", "3"],
                     "--microbatches 3 does not divide the batch of each data-parallel replica",
                     ranks=2)
    expect_bad_input(base + ["--pp", "2", "--microbatches", "3", "--global-batch", "36",
                             "--pp-schedule", "interleaved"],
                     ["--pp-schedule interleaved with --pp 2 and --microbatches 3", "multiple"],
                     ranks=2)
    expect_bad_input(base + ["--pp", "2", "--pp-schedule", "zb-h1"],
                     "--pp-schedule zb-h1 with --pp 2 and --microbatches 1", ranks=2)
    expect_bad_input(base + ["--pp", "2", "--microbatches", "2", "--pp-schedule", "interleaved",
                             "--pp-stages-per-rank", "8"],
                     "16 stages, but resnet20 has only 14 layers", ranks=2)
    expect_bad_input(base + ["--pp", "2", "--pp-partition", "3,9"], "has 2 cut points; 2 stages need 1",
                     ranks=2)
    expect_bad_input(base + ["--pp", "2", "--pp-partition", "20"], "--pp-partition '20' on 14 layers",
                     ranks=2)
    expect_bad_input(base + ["--pp-partition", "4,x"], "--pp-partition '4,x' is not")
    expect_bad_input(base + ["--pp-schedule", "pipedream"], "unknown --pp-schedule 'pipedream'")
    expect_bad_input(base + ["--pp-stages-per-rank", "2"], "needs --pp-schedule interleaved")


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CASES:
        print("usage: fault_test.py " + "|".join(sorted(CASES)))
        sys.exit(2)
    os.chdir(os.path.dirname(os.path.abspath(__file__)) + "/../..")
    CASES[sys.argv[1]]()
    print("PASS")
