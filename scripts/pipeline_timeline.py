#!/usr/bin/python3
"""Draw the timeline of one pipeline step from the engine's per-rank traces.

    pipeline_timeline.py TRACE.csv... -o OUT.png [--title TEXT]
    pipeline_timeline.py trace-rank*.json -o OUT.png [--step N] [--title TEXT]

Each TRACE.csv is what dtrain::parallel::pipeline::trace_to_csv writes
(rank,kind,stage,microbatch,start,end,wait,heap; benchmarks/pipeline_perf
--trace writes one per rank). A trace-rankRRRRR.json is a trainer's Chrome
trace (dtrain-resnet --pp N --trace): its F/B/I/W spans of step N (default:
the last step that every given rank traced) are drawn. One row per rank, one box per compute action
(F blue, B orange, I red, W green), labelled with its microbatch (and stage
when a rank holds several); the white gaps are the bubble. Times are shifted
so that the earliest action starts at 0. Prints the measured idle fraction:
1 - (busy time of all ranks) / (ranks x step length).

Exit status: 0 on success, 2 on bad input (with a message on stderr).
"""

import argparse
import csv
import json
import sys

COLORS = {"F": "#1f77b4", "B": "#ff7f0e", "I": "#d62728", "W": "#2ca02c"}


def read_chrome_traces(paths, step):
    """(rank, kind, stage, microbatch, start, end) of one step's compute spans."""
    by_step = {}
    for path in paths:
        try:
            with open(path) as f:
                events = json.load(f)["traceEvents"]
            for e in events:
                a = e.get("args", {})
                if e.get("ph") != "X" or e["name"] not in COLORS or "microbatch" not in a:
                    continue
                start = e["ts"] / 1e6
                by_step.setdefault(int(a["step"]), {}).setdefault(path, []).append(
                    (int(e["pid"]), e["name"], int(a["stage"]), int(a["microbatch"]), start,
                     start + e["dur"] / 1e6))
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise SystemExit(f"pipeline_timeline.py: {path}: not a trainer trace ({e})")
    complete = [s for s, files in by_step.items() if len(files) == len(paths)]
    if step is None:
        if not complete:
            raise SystemExit("pipeline_timeline.py: no step with pipeline actions in every trace "
                             "(was the run made with --pp and --trace?)")
        step = max(complete)
    if step not in complete:
        raise SystemExit(f"pipeline_timeline.py: step {step} is not in every trace "
                         f"(steps with pipeline actions: {sorted(complete)})")
    return [a for actions in by_step[step].values() for a in actions], step


def read_traces(paths, step=None):
    if all(p.endswith(".json") for p in paths):
        return read_chrome_traces(paths, step)
    if any(p.endswith(".json") for p in paths):
        raise SystemExit("pipeline_timeline.py: give either CSV traces or trainer .json traces")
    actions = []
    for path in paths:
        try:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    if row["kind"] not in COLORS:
                        continue
                    actions.append(
                        (int(row["rank"]), row["kind"], int(row["stage"]),
                         int(row["microbatch"]), float(row["start"]), float(row["end"])))
        except (OSError, KeyError, ValueError) as e:
            raise SystemExit(f"pipeline_timeline.py: {path}: not a pipeline trace ({e})")
    if not actions:
        raise SystemExit("pipeline_timeline.py: no compute actions in the traces")
    return actions, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--title", default="")
    parser.add_argument("--step", type=int, default=None,
                        help="with trainer .json traces: the step to draw (default: the last)")
    args = parser.parse_args()
    actions, step = read_traces(args.traces, args.step)
    t0 = min(a[4] for a in actions)
    t1 = max(a[5] for a in actions)
    ranks = sorted({a[0] for a in actions})
    busy = sum(a[5] - a[4] for a in actions)
    idle = 1 - busy / (len(ranks) * (t1 - t0))
    which = "" if step is None else f" (training step {step})"
    print(f"{len(ranks)} ranks, step{which} {1000 * (t1 - t0):.1f} ms, idle fraction {idle:.4f}")
    stages_per_rank = {r: len({a[2] for a in actions if a[0] == r}) for r in ranks}

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pipeline_timeline.py: needs python3-matplotlib (scripts/setup.sh installs it)",
              file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.2))
    for rank, kind, stage, mb, start, end in actions:
        y = len(ranks) - 1 - ranks.index(rank)
        ax.broken_barh([(1000 * (start - t0), 1000 * (end - start))], (y - 0.4, 0.8),
                       facecolors=COLORS[kind], edgecolor="white", linewidth=0.5)
        label = f"{mb}" if stages_per_rank[rank] == 1 else f"{stage}.{mb}"
        ax.text(1000 * ((start + end) / 2 - t0), y, label, ha="center", va="center", fontsize=6,
                color="white")
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {r}" for r in reversed(ranks)])
    ax.set_xlabel("ms")
    title = args.title or "pipeline step"
    ax.set_title(f"{title}: idle fraction {idle:.3f}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), loc="upper right", ncol=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
