#!/usr/bin/python3
"""Plot a training run from the trainer's per-rank metrics files.

    plot_metrics.py METRICS_DIR_OR_FILES... -o OUT.png [--rank 0] [--window N]

A directory argument stands for its file metrics-rank<RRRRR>.jsonl of the
chosen rank; file arguments are read whole and their records of the chosen
rank are kept. Writes one PNG with four panels (loss, accuracy, throughput,
time per step) and prints a one-line summary. See docs/metrics.md for the
file format.

Exit status: 0 on success, 2 on bad input (with a message on stderr).
"""

import argparse
import json
import math
import os
import re
import sys

from dtrain_files import InputError, expand_paths

RANK_FILE_RE = re.compile(r"^metrics-rank(\d+)\.jsonl$")

# Stacked in this order, bottom to top; "other" is step_s minus their sum.
BREAKDOWN = [
    ("data_wait_s", "data wait", "#8c8c8c"),
    ("forward_s", "forward", "#1f77b4"),
    ("backward_s", "backward", "#ff7f0e"),
    ("comm_exposed_s", "exposed communication", "#d62728"),
    ("optimizer_s", "optimizer", "#2ca02c"),
]


def rank_of_file_name(path):
    m = RANK_FILE_RE.match(os.path.basename(path))
    return int(m.group(1)) if m else None


def metrics_files(args_paths, rank):
    """The files to read, in order."""
    def for_rank(directory, names):
        chosen = [f for f in names if rank_of_file_name(f) == rank]
        if not chosen:
            present = ", ".join(str(rank_of_file_name(f)) for f in names)
            raise InputError(f"{directory}: no metrics file for rank {rank} (ranks present: "
                             f"{present}); choose one with --rank")
        return chosen

    files = expand_paths(args_paths, RANK_FILE_RE,
                         "metrics files (metrics-rank<RRRRR>.jsonl)", for_rank)
    if not files:
        raise InputError("no metrics files given")
    return files


def number(rec, key, where, required):
    v = rec.get(key)
    if v is None:
        if required:
            raise InputError(f"{where}: {rec.get('kind')} record has no '{key}'")
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"{where}: '{key}' is not a number: {v!r}")
    return float(v)


def read_records(files, rank):
    """Train and eval records of `rank` (last occurrence of each step wins),
    and the run records, in file order."""
    train, evals, runs = {}, {}, []
    for path in files:
        file_rank = rank_of_file_name(path)
        try:
            f = open(path, encoding="utf-8")
        except OSError as e:
            raise InputError(f"{path}: cannot open: {e.strerror}") from None
        with f:
            for lineno, line in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{where}: malformed line (not JSON: {e.msg})") from None
                if not isinstance(rec, dict):
                    raise InputError(f"{where}: malformed line (not a JSON object)")
                kind = rec.get("kind")
                if not isinstance(kind, str):
                    raise InputError(f"{where}: malformed line (no \"kind\")")
                rec_rank = rec.get("rank", file_rank)
                if rec_rank is None:
                    raise InputError(f"{where}: record has no \"rank\" and the file name does not "
                                     f"give one")
                if rec_rank != rank:
                    continue
                if kind == "run":
                    runs.append(rec)
                    continue
                if kind not in ("train", "eval"):
                    continue  # checkpoint records and kinds added later
                step = rec.get("step")
                if isinstance(step, bool) or not isinstance(step, int):
                    raise InputError(f"{where}: {kind} record has no integer \"step\"")
                if kind == "train":
                    point = {"loss": number(rec, "loss", where, True)}
                    for key in ("accuracy", "lr", "images_per_s", "step_s") + tuple(
                            k for k, _, _ in BREAKDOWN):
                        point[key] = number(rec, key, where, False)
                    train[step] = point
                else:
                    evals[step] = {"loss": number(rec, "loss", where, False),
                                   "accuracy": number(rec, "accuracy", where, False)}
    return train, evals, runs


def moving_average(values, window):
    """Trailing mean over up to `window` points, skipping NaN."""
    out, buf, total, count = [], [], 0.0, 0
    for v in values:
        buf.append(v)
        if not math.isnan(v):
            total += v
            count += 1
        if len(buf) > window:
            old = buf.pop(0)
            if not math.isnan(old):
                total -= old
                count -= 1
        out.append(total / count if count else math.nan)
    return out


def finite(values):
    return [v for v in values if not math.isnan(v)]


def summary_line(rank, steps, train, evals, runs):
    if steps:
        step_part = f"{len(steps)} steps ({steps[0]}-{steps[-1]})"
    else:
        step_part = "0 steps"
    if evals:
        last = max(evals)
        acc = evals[last]["accuracy"]
        eval_part = f"last eval accuracy {acc:.4f} (step {last})"
    else:
        eval_part = "last eval accuracy n/a"
    ips = finite([train[s]["images_per_s"] for s in steps])
    ips_part = f"mean {sum(ips) / len(ips):.1f} images/s" if ips else "mean images/s n/a"
    return f"rank {rank}: {step_part}, {len(runs)} run(s), {eval_part}, {ips_part}"


def plot(out_path, rank, train, evals, runs, window):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("matplotlib is not installed for this interpreter "
                         "(Debian: apt-get install python3-matplotlib)") from None

    steps = sorted(train)
    esteps = sorted(evals)
    col = lambda key: [train[s][key] for s in steps]  # noqa: E731

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    (ax_loss, ax_acc), (ax_ips, ax_time) = axes
    fig.suptitle(f"Training metrics, rank {rank} "
                 f"({len(steps)} steps, moving average over {window})")

    resumes = [r.get("resumed_from_step") for r in runs]
    resumes = [s for s in resumes if isinstance(s, int) and not isinstance(s, bool)]

    # Loss.
    loss = col("loss")
    ax_loss.plot(steps, loss, color="#1f77b4", alpha=0.25, linewidth=0.8, label="train (raw)")
    ax_loss.plot(steps, moving_average(loss, window), color="#1f77b4", linewidth=1.8,
                 label="train (moving average)")
    if esteps:
        ax_loss.plot(esteps, [evals[s]["loss"] for s in esteps], "o", color="#d62728",
                     label="eval")
    for i, s in enumerate(resumes):
        ax_loss.axvline(s, color="#7f7f7f", linestyle="--", linewidth=0.8,
                        label="resumed" if i == 0 else None)
    ax_loss.set_title("Loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    if finite(loss) and min(finite(loss)) > 0 and max(finite(loss)) / min(finite(loss)) > 20:
        ax_loss.set_yscale("log")
    ax_loss.legend(loc="upper right")

    # Accuracy.
    acc = col("accuracy")
    if finite(acc):
        ax_acc.plot(steps, moving_average(acc, window), color="#1f77b4", linewidth=1.8,
                    label="train batch (moving average)")
    eacc = [evals[s]["accuracy"] for s in esteps]
    if finite(eacc):
        ax_acc.plot(esteps, eacc, "o-", color="#d62728", label="eval (test split)")
        last = esteps[-1]
        ax_acc.annotate(f"{evals[last]['accuracy']:.4f}", (last, evals[last]["accuracy"]),
                        textcoords="offset points", xytext=(-10, 8), ha="right")
    ax_acc.set_title("Accuracy")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend(loc="lower right")

    # Throughput.
    ips = col("images_per_s")
    if finite(ips):
        ax_ips.plot(steps, ips, color="#2ca02c", alpha=0.25, linewidth=0.8, label="raw")
        ax_ips.plot(steps, moving_average(ips, window), color="#2ca02c", linewidth=1.8,
                    label="moving average")
        mean = sum(finite(ips)) / len(finite(ips))
        ax_ips.axhline(mean, color="black", linestyle=":", linewidth=1,
                       label=f"mean {mean:.0f}")
        ax_ips.legend(loc="lower right")
    else:
        ax_ips.text(0.5, 0.5, "no images_per_s in the records", ha="center",
                    transform=ax_ips.transAxes)
    ax_ips.set_title("Throughput (all ranks)")
    ax_ips.set_xlabel("step")
    ax_ips.set_ylabel("images/s")
    ax_ips.set_ylim(bottom=0)

    # Time per step: stacked areas of moving averages, in milliseconds; the
    # legend gives each part's mean over all steps.
    step_s = col("step_s")
    parts = [(label, color, col(key)) for key, label, color in BREAKDOWN]
    if finite(step_s):
        stack, labels, colors = [], [], []
        known = [0.0] * len(steps)
        for label, color, values in parts:
            values = [0.0 if math.isnan(v) else v for v in values]
            known = [k + v for k, v in zip(known, values)]
            stack.append(values)
            labels.append(label)
            colors.append(color)
        other = [max(0.0, t - k) if not math.isnan(t) else 0.0 for t, k in zip(step_s, known)]
        stack.append(other)
        labels.append("other")
        colors.append("#e0e0e0")
        means_ms = [1e3 * sum(v) / len(v) for v in stack]
        ys = [[1e3 * v for v in moving_average(values, window)] for values in stack]
        ax_time.stackplot(steps, ys, colors=colors,
                          labels=[f"{lab} ({m:.1f} ms)" for lab, m in zip(labels, means_ms)])
        handles, legend_labels = ax_time.get_legend_handles_labels()
        ax_time.legend(handles[::-1], legend_labels[::-1], loc="upper right", fontsize="small",
                       title=f"mean step {1e3 * sum(finite(step_s)) / len(finite(step_s)):.1f} ms")
        # Head room for the legend above the stack.
        top = max((sum(col) for col in zip(*ys)), default=0.0)
        ax_time.set_ylim(0, top / 0.55 if top > 0 else 1.0)
    else:
        ax_time.text(0.5, 0.5, "no step_s in the records", ha="center",
                     transform=ax_time.transAxes)
    ax_time.set_title(f"Time per step, rank {rank} (moving average)")
    ax_time.set_xlabel("step")
    ax_time.set_ylabel("ms")

    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out_path)
    except OSError as e:
        raise InputError(f"{out_path}: cannot write: {e.strerror}") from None
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Plot loss, accuracy, throughput and the time per step from "
                    "metrics-rank<RRRRR>.jsonl files.")
    ap.add_argument("inputs", nargs="+", metavar="METRICS_DIR_OR_FILE",
                    help="a metrics directory, or metrics .jsonl files")
    ap.add_argument("-o", "--output", required=True, metavar="OUT.png", help="the PNG to write")
    ap.add_argument("--rank", type=int, default=0, help="the rank to plot (default 0)")
    ap.add_argument("--window", type=int, default=0,
                    help="moving-average window in steps (default: about 1/20 of the steps, "
                         "between 1 and 50)")
    args = ap.parse_args(argv)
    try:
        if args.window < 0:
            raise InputError("--window must not be negative")
        files = metrics_files(args.inputs, args.rank)
        train, evals, runs = read_records(files, args.rank)
        if not train and not evals:
            raise InputError(f"no train or eval records for rank {args.rank} in "
                             f"{', '.join(files)}")
        steps = sorted(train)
        window = args.window or max(1, min(50, len(steps) // 20))
        plot(args.output, args.rank, train, evals, runs, window)
    except InputError as e:
        print(f"plot_metrics.py: error: {e}", file=sys.stderr)
        return 2
    print(summary_line(args.rank, steps, train, evals, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
