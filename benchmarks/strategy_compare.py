#!/usr/bin/python3
"""strategy_compare: measure every dp x pp x tp layout of an example model.

    benchmarks/strategy_compare.py --model resnet20 --ranks 2 --global-batch 128 \\
        --steps 14 --warmup 4 --repeats 3 --predict --out strategy-results

For the model, the world size and the global batch it
  1. measures the model's profile on this machine (benchmarks/strategy_profile),
  2. enumerates every valid layout and predicts each one (dtrain-plan --json:
     the same enumeration the planner's tests check),
  3. runs each layout through the model's program for --steps steps, the
     layouts alternated over --repeats rounds (forward order, then reversed),
     and takes the median of the rounds,
  4. predicts the layouts again with the base memory per rank the program
     itself reported in those runs (the trainer's base_rss_bytes, the median;
     the profiler's process is not the training program),
  5. writes strategies.json, strategies.md (sorted by measured throughput, the
     prediction beside each row with --predict) and strategies.png.

Per layout it records throughput, the step split into compute, communication
and bubble (from the trainer's metrics, on the rank with the most compute),
the peak resident set per rank, and the bytes the rank that sends most sends
per step (the trainer's comm_sent_bytes: its CountingCommunicator, bus bytes). A layout that fails is a row with its
reason; the run goes on. More ranks than cores oversubscribe, and the output
says so.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    # program, what throughput counts, units per sample, data set under data/,
    # the program's arguments that every layout shares; ZeRO-1 only where the
    # program has it (dtrain-gpt has not).
    "resnet20": dict(program="examples/resnet/dtrain-resnet", unit="images", units_per_sample=1,
                     data="fashion-mnist/train", args=["--model", "resnet20", "--test-data", "none"],
                     zero=True),
    "gpt": dict(program="examples/gpt/dtrain-gpt", unit="tokens", units_per_sample=64,
                data="fortunes/train", args=["--val-data", "none", "--sample-tokens", "0"],
                zero=False),
}


def log(msg):
    print(msg, flush=True)


def run(cmd, timeout, env=None):
    """Runs cmd; returns (ok, combined output)."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout, env=env)
        return p.returncode == 0, p.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return False, out + f"\n(timed out after {timeout} s)"


def mpirun(args, n):
    launcher = os.path.join(ROOT, "scripts/launch/dtrain-mpirun")
    return [launcher, "-n", str(n)] + args


def failure_reason(output):
    lines = [l.strip() for l in output.splitlines() if l.strip()]
    for l in lines:
        if "error" in l.lower() or "invalid" in l.lower() or "refused" in l.lower() or "timed out" in l:
            return l[:300]
    return (lines[-1] if lines else "no output")[:300]


def layout_flags(l):
    flags = []
    if l["pp"] > 1:
        flags += ["--pp", str(l["pp"]), "--microbatches", str(l["microbatches"]),
                  "--pp-schedule", l["schedule"], "--pp-stages-per-rank", str(l["stages_per_rank"])]
    if l["tp"] > 1:
        flags += ["--tp", str(l["tp"])]
        if l["sequence_parallel"]:
            flags += ["--sequence-parallel=true"]
    if l["zero"]:
        flags += ["--zero=true"]
    return flags


def measure(args, model, layout, out_dir):
    """One run of one layout: a dict of measurements, or {'error': reason}."""
    cmd = [args.program] + model["args"] + ["--train-data", args.data, "--checkpoint-dir", "none",
                                             "--out", out_dir,
           "--steps", str(args.steps), "--global-batch", str(args.global_batch),
           "--threads", str(args.threads), "--progress", "lines", "--log-every", "1000",
           "--resume=false"] + layout_flags(layout)
    ok, output = run(mpirun(cmd, args.ranks), args.timeout)
    if not ok:
        return {"error": failure_reason(output)}
    ranks = []
    bases = []
    for r in range(args.ranks):
        path = os.path.join(out_dir, "metrics", f"metrics-rank{r:05d}.jsonl")
        try:
            rows = [json.loads(l) for l in open(path) if l.strip()]
        except OSError as e:
            return {"error": f"no metrics from rank {r}: {e}"}
        bases.append(max([x.get("base_rss_bytes", 0) for x in rows if x.get("kind") == "run"] or [0]))
        steps = [x for x in rows if x.get("kind") == "train"][args.warmup:]
        if not steps:
            return {"error": f"rank {r} logged no step after {args.warmup} warm-up steps"}
        ranks.append(steps)
    step_s = statistics.median(x["step_s"] for x in ranks[0])

    def split(steps):
        mean = lambda k: statistics.fmean(x.get(k, 0.0) for x in steps)
        if "pipeline_s" in steps[0]:
            compute = mean("compute_s") + mean("optimizer_s")
            bubble = mean("input_wait_s")
            comm = max(0.0, mean("pipeline_s") - mean("compute_s") - bubble)
        else:
            comm = mean("sync_s")
            compute = mean("forward_s") + mean("backward_s") + mean("optimizer_s")
            bubble = 0.0
        return compute, comm, bubble

    splits = [split(s) for s in ranks]
    slowest = max(range(len(splits)), key=lambda i: splits[i][0])
    compute, comm, bubble = splits[slowest]
    return {
        "step_s": step_s,
        "throughput": args.global_batch * model["units_per_sample"] / step_s,
        "compute_s": compute,
        "communication_s": comm,
        "bubble_s": bubble,
        "peak_rss_bytes": max(s[-1].get("max_rss_bytes", 0) for s in ranks),
        # The rank that sends the most: its median over the timed steps.
        "sent_bytes": max(statistics.median(x.get("comm_sent_bytes", 0) for x in s) for s in ranks),
        "base_rss_bytes": max(bases),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=14, help="steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=4, help="steps left out of each run's timing")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all layouts; medians")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    ap.add_argument("--data", help="training data set (default: data/<the model's>)")
    ap.add_argument("--build", default=os.environ.get("BUILD_DIR", os.path.join(ROOT, "build")),
                    help="where the programs are (default: $BUILD_DIR or build/)")
    ap.add_argument("--program", help="the model's training program (default: in --build)")
    ap.add_argument("--profiler", help="strategy_profile (default: in --build)")
    ap.add_argument("--planner", help="dtrain-plan (default: in --build)")
    ap.add_argument("--out", default="strategy-results")
    ap.add_argument("--predict", action="store_true", help="put the planner's prediction beside each row")
    ap.add_argument("--schedules", default="gpipe,1f1b,interleaved,zb-h1")
    ap.add_argument("--microbatch-multiples", default="1,2,4")
    ap.add_argument("--no-zero", action="store_true")
    ap.add_argument("--no-sequence-parallel", action="store_true")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run")
    args = ap.parse_args()
    model = MODELS[args.model]
    if args.ranks < 1 or args.global_batch < 1 or args.repeats < 1:
        ap.error("--ranks, --global-batch and --repeats must be >= 1")
    if args.steps <= args.warmup:
        ap.error(f"--steps ({args.steps}) must be more than --warmup ({args.warmup})")
    args.program = args.program or os.path.join(args.build, model["program"])
    args.profiler = args.profiler or os.path.join(args.build, "benchmarks/strategy_profile")
    args.planner = args.planner or os.path.join(args.build, "src/plan/dtrain-plan")
    for path in (args.program, args.profiler, args.planner):
        if not os.access(path, os.X_OK):
            sys.exit(f"strategy_compare: {path} is not an executable program (build it, or give --build)")
    args.data = args.data or os.path.join(ROOT, "data", model["data"])
    if not os.path.isfile(os.path.join(args.data, "manifest.json")):
        sys.exit(f"strategy_compare: no data set at {args.data} (scripts/demo.sh makes it, or give --data)")
    os.makedirs(args.out, exist_ok=True)
    cores = os.cpu_count() or 1
    started = time.time()
    note = (f"{args.ranks} ranks on {cores} cores: oversubscribed, ranks share cores"
            if args.ranks > cores else f"{args.ranks} ranks on {cores} cores")
    log(f"strategy_compare: {args.model}, {note}, global batch {args.global_batch}")

    profile = os.path.join(args.out, "profile.json")
    profile_args = [args.profiler, "--model", args.model, "--out", profile]
    if args.model == "gpt":
        # The data set's vocabulary (docs/data.md) sizes the embedding.
        manifest = json.load(open(os.path.join(args.data, "manifest.json")))
        profile_args += ["--vocab", str(manifest["vocabulary"]["size"]), "--microbatch", "16"]
    ok, output = run(mpirun(profile_args, max(2, args.ranks)), args.timeout)
    if not ok:
        sys.exit("strategy_compare: strategy_profile failed:\n" + output)
    log(output.strip().splitlines()[-1])
    predicted_path = os.path.join(args.out, "predicted.json")
    plan_cmd = [args.planner, profile, "--world", str(args.ranks),
                "--global-batch", str(args.global_batch), "--schedules", args.schedules,
                "--microbatch-multiples", args.microbatch_multiples, "--json", predicted_path]
    if args.no_zero or not model["zero"]:
        plan_cmd.append("--no-zero")
    if args.no_sequence_parallel:
        plan_cmd.append("--no-sequence-parallel")
    ok, plan_output = run(plan_cmd, 120)
    if not ok:
        sys.exit("strategy_compare: dtrain-plan failed:\n" + plan_output)
    predicted = json.load(open(predicted_path))
    rejected = [l.split("not valid:", 1) for l in plan_output.splitlines() if "not valid:" in l]
    layouts = sorted(predicted, key=lambda p: (p["tp"], p["pp"], p["layout"]))
    log(f"{len(layouts)} layouts, {args.repeats} round(s) of {args.steps} steps each")

    runs = {p["layout"]: [] for p in layouts}
    with tempfile.TemporaryDirectory(prefix="strategy-compare-") as work:
        for r in range(args.repeats):
            order = layouts if r % 2 == 0 else list(reversed(layouts))
            for p in order:
                name = p["layout"]
                m = measure(args, model, p, os.path.join(work, f"{name.replace(' ', '_')}-{r}"))
                runs[name].append(m)
                log(f"  round {r + 1}: {name:<34} "
                    + (f"{m['throughput']:10.1f} {model['unit']}/s" if "error" not in m else "failed: " + m["error"]))

    # The planner's base memory per rank, from the program itself: what each
    # rank held before it built its model (the trainer's base_rss_bytes),
    # median over the runs, instead of the profiler's own process. The
    # layouts are predicted again with it.
    bases = [m["base_rss_bytes"] for ms in runs.values() for m in ms
             if "error" not in m and m["base_rss_bytes"] > 0]
    base_note = ""
    if bases:
        calibrated = json.load(open(profile))
        profiled_base = calibrated["machine"]["base_bytes_per_rank"]
        calibrated["machine"]["base_bytes_per_rank"] = int(statistics.median(bases))
        calibrated_path = os.path.join(args.out, "profile-calibrated.json")
        json.dump(calibrated, open(calibrated_path, "w"), indent=2)
        plan_cmd[1] = calibrated_path
        ok, plan_output = run(plan_cmd, 120)
        if not ok:
            sys.exit("strategy_compare: dtrain-plan failed on the calibrated profile:\n" + plan_output)
        again = {p["layout"]: p for p in json.load(open(predicted_path))}
        layouts = [again.get(p["layout"], p) for p in layouts]
        base_note = (f"base memory per rank {int(statistics.median(bases)) / 2**20:.0f} MiB "
                     f"(the program's, measured; the profiler's process: {profiled_base / 2**20:.0f} MiB)")
        log("calibrated: " + base_note)

    rows = []
    for p in layouts:
        done = [m for m in runs[p["layout"]] if "error" not in m]
        row = {"layout": p["layout"], "dp": p["dp"], "pp": p["pp"], "tp": p["tp"],
               "schedule": p["schedule"], "microbatches": p["microbatches"],
               "sequence_parallel": p["sequence_parallel"], "zero": p["zero"],
               "runs": len(done), "predicted": p}
        if not done:
            row["error"] = runs[p["layout"]][0]["error"]
        else:
            for k in ("step_s", "throughput", "compute_s", "communication_s", "bubble_s", "sent_bytes"):
                row[k] = statistics.median(m[k] for m in done)
            row["peak_rss_bytes"] = max(m["peak_rss_bytes"] for m in done)
        rows.append(row)
    rows.sort(key=lambda x: -x.get("throughput", -1))
    for name, reason in rejected:
        rows.append({"layout": name.strip(), "error": "not valid: " + reason.strip()})
    wall = time.time() - started
    if base_note:
        note += "; " + base_note
    json.dump({"model": args.model, "ranks": args.ranks, "cores": cores, "global_batch": args.global_batch,
               "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "note": note,
               "wall_seconds": wall, "profile": json.load(open(profile)), "rows": rows},
              open(os.path.join(args.out, "strategies.json"), "w"), indent=2)
    table = markdown(args, model, rows, note, wall)
    open(os.path.join(args.out, "strategies.md"), "w").write(table)
    print()
    print(table)
    plot(args, model, rows)


def markdown(args, model, rows, note, wall):
    unit = model["unit"] + "/s"
    mib = lambda b: f"{b / 2**20:.0f}"
    head = [f"{args.model}, {note}, global batch {args.global_batch}; {args.steps} steps per run "
            f"({args.warmup} warm-up), median of {args.repeats} round(s); {wall:.0f} s in all.", ""]
    cols = ["layout", unit, "step ms", "compute ms", "comm ms", "bubble ms", "peak RSS MiB",
            "sent MB/step"]
    if args.predict:
        cols += [f"predicted {unit}", "predicted step ms", "step pred/meas", "predicted peak MiB",
                 "predicted sent MB"]
    head += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "throughput" not in r:
            head.append(f"| {r['layout']} | " + r["error"].replace("|", "/") + " |" + " |" * (len(cols) - 2))
            continue
        cells = [r["layout"], f"{r['throughput']:.1f}", f"{r['step_s'] * 1e3:.1f}",
                 f"{r['compute_s'] * 1e3:.1f}", f"{r['communication_s'] * 1e3:.1f}",
                 f"{r['bubble_s'] * 1e3:.1f}", mib(r["peak_rss_bytes"]), f"{r['sent_bytes'] / 1e6:.2f}"]
        if args.predict:
            p = r["predicted"]
            cells += [f"{p['throughput']:.1f}", f"{p['step_seconds'] * 1e3:.1f}",
                      f"{p['step_seconds'] / r['step_s']:.2f}", mib(p["peak_bytes"]),
                      f"{p['bytes_sent_per_step'] / 1e6:.2f}"]
        head.append("| " + " | ".join(cells) + " |")
    measured = [r for r in rows if "throughput" in r]
    if args.predict and measured:
        best = measured[0]
        top = min(measured, key=lambda r: r["predicted"]["step_seconds"])
        within = sum(1 for r in measured
                     if abs(r["predicted"]["step_seconds"] / r["step_s"] - 1) <= 0.25)
        mem = sum(1 for r in measured
                  if abs(r["predicted"]["peak_bytes"] / r["peak_rss_bytes"] - 1) <= 0.20)
        head += ["",
                 f"Planner's top layout: {top['layout']} (measured {top['throughput']:.1f} {unit}, "
                 f"{top['throughput'] / best['throughput']:.2f} of the fastest, {best['layout']}).",
                 f"Predicted step time within 25% of measured: {within} of {len(measured)} layouts; "
                 f"predicted peak memory within 20%: {mem} of {len(measured)}."]
    return "\n".join(head) + "\n"


def plot(args, model, rows):
    measured = [r for r in rows if "throughput" in r]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("strategy_compare: no matplotlib (python3-matplotlib): strategies.png not drawn")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.35 * len(measured) + 1.8), sharey=True)
    names = [r["layout"] for r in measured][::-1]
    a.barh(names, [r["throughput"] for r in measured][::-1], color="tab:blue", label="measured")
    if args.predict:
        a.scatter([r["predicted"]["throughput"] for r in measured][::-1], names, color="black",
                  marker="|", s=200, label="predicted", zorder=3)
        a.legend(loc="lower right")
    a.set_xlabel(model["unit"] + "/s")
    b.barh(names, [r["peak_rss_bytes"] / 2**20 for r in measured][::-1], color="tab:orange")
    b.set_xlabel("peak resident set per rank, MiB")
    fig.suptitle(f"{args.model}, {args.ranks} ranks, global batch {args.global_batch}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "strategies.png"), dpi=100)


if __name__ == "__main__":
    main()
