#!/usr/bin/python3
"""Merge the trainer's per-rank Chrome traces into one time line.

    merge_traces.py TRACE_DIR_OR_FILES... -o merged.json

A directory argument stands for all its trace-rank<RRRRR>.json files. The
output has one process per rank (pid = rank, named "rank R", sorted by
rank), threads named "compute" (tid 0) and "communication" (tid 1), and every
timestamp shifted so that the earliest event is at 0; otherData.ts_offset_us
holds the shift (original ts = ts + ts_offset_us, microseconds since the
unix epoch). Opens in ui.perfetto.dev and chrome://tracing. See
docs/metrics.md.

Exit status: 0 on success, 2 on bad input (with a message on stderr).
"""

import argparse
import json
import os
import re
import sys

from dtrain_files import InputError, expand_paths

RANK_FILE_RE = re.compile(r"^trace-rank(\d+)\.json$")
THREAD_NAMES = {0: "compute", 1: "communication"}
# Metadata this script writes itself; the inputs' own copies are dropped.
OWN_METADATA = {"process_name", "process_sort_index", "process_labels"}
OWN_THREAD_METADATA = {"thread_name", "thread_sort_index"}


def trace_files(paths):
    return expand_paths(paths, RANK_FILE_RE, "trace files (trace-rank<RRRRR>.json)")


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load(path):
    """(rank, world_size or None, events) of one trace file."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(doc, dict) or "traceEvents" not in doc:
        raise InputError(f"{path}: not a trace: no \"traceEvents\" (expected "
                         f"{{\"traceEvents\": [...], ...}})")
    events = doc["traceEvents"]
    if not isinstance(events, list):
        raise InputError(f"{path}: \"traceEvents\" is not a list")
    other = doc.get("otherData")
    other = other if isinstance(other, dict) else {}

    for i, ev in enumerate(events):
        where = f"{path}: traceEvents[{i}]"
        if not isinstance(ev, dict):
            raise InputError(f"{where}: not an object")
        ph = ev.get("ph")
        if not isinstance(ph, str):
            raise InputError(f"{where}: no \"ph\"")
        if ph != "M" and not is_number(ev.get("ts")):
            raise InputError(f"{where}: no numeric \"ts\"")
        if ph == "X" and not is_number(ev.get("dur")):
            raise InputError(f"{where}: complete event (ph X) without a numeric \"dur\"")

    rank = other.get("rank")
    if not (isinstance(rank, int) and not isinstance(rank, bool)):
        m = RANK_FILE_RE.match(os.path.basename(path))
        if m:
            rank = int(m.group(1))
        else:
            pids = {ev.get("pid") for ev in events if ev.get("ph") != "M"}
            if len(pids) == 1 and isinstance(next(iter(pids)), int):
                rank = pids.pop()
            else:
                raise InputError(f"{path}: cannot tell the rank (no otherData.rank, the file "
                                 f"name is not trace-rank<RRRRR>.json, and the events do not "
                                 f"share one pid)")
    world = other.get("world_size")
    world = world if isinstance(world, int) and not isinstance(world, bool) else None
    clock = other.get("clock")
    if clock is not None and clock != "unix_us":
        raise InputError(f"{path}: otherData.clock is {clock!r}; only \"unix_us\" traces can "
                         f"be put on one time line")
    return rank, world, events


def merge(files):
    by_rank = {}
    worlds = set()
    for path in files:
        rank, world, events = load(path)
        if rank in by_rank:
            raise InputError(f"{path}: rank {rank} again (already read from {by_rank[rank][0]})")
        by_rank[rank] = (path, events)
        if world is not None:
            worlds.add(world)

    timed = [ev for _, events in by_rank.values() for ev in events if ev["ph"] != "M"]
    if not timed:
        raise InputError("no events in " + ", ".join(files))
    offset = min(ev["ts"] for ev in timed)

    metadata, out = [], []
    for rank in sorted(by_rank):
        _, events = by_rank[rank]
        metadata.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "ts": 0,
                         "args": {"name": f"rank {rank}"}})
        metadata.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
                         "ts": 0, "args": {"sort_index": rank}})
        tids = {0, 1} | {ev.get("tid") for ev in events if isinstance(ev.get("tid"), int)}
        for tid in sorted(tids):
            if tid in THREAD_NAMES:
                metadata.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                                 "ts": 0, "args": {"name": THREAD_NAMES[tid]}})
                metadata.append({"name": "thread_sort_index", "ph": "M", "pid": rank,
                                 "tid": tid, "ts": 0, "args": {"sort_index": tid}})
        for ev in events:
            ev = dict(ev)
            ev["pid"] = rank
            if ev["ph"] == "M":
                if ev.get("name") in OWN_METADATA:
                    continue
                if ev.get("name") in OWN_THREAD_METADATA and ev.get("tid") in THREAD_NAMES:
                    continue
                ev["ts"] = 0
                metadata.append(ev)
                continue
            # Rounded to nanoseconds: the subtraction of two ~1.7e15 floats
            # leaves noise below that.
            ev["ts"] = round(ev["ts"] - offset, 3)
            out.append(ev)

    # By time; at equal times the longer (enclosing) event first, so that
    # viewers nest them.
    out.sort(key=lambda ev: (ev["ts"], -(ev.get("dur") or 0), ev["pid"],
                             ev.get("tid") if isinstance(ev.get("tid"), int) else 0))
    ranks = sorted(by_rank)
    other = {
        "clock": "unix_us",
        "ts_offset_us": offset,
        "ts_note": "ts is microseconds after ts_offset_us (microseconds since the unix epoch)",
        "ranks": ranks,
        "sources": {str(r): by_rank[r][0] for r in ranks},
    }
    if len(worlds) == 1:
        other["world_size"] = worlds.pop()
        missing = sorted(set(range(other["world_size"])) - set(ranks))
        if missing:
            print(f"merge_traces.py: warning: no trace for rank(s) "
                  f"{', '.join(map(str, missing))} of world size {other['world_size']}",
                  file=sys.stderr)
    elif len(worlds) > 1:
        print(f"merge_traces.py: warning: the files disagree on the world size "
              f"({', '.join(map(str, sorted(worlds)))})", file=sys.stderr)
    return {"traceEvents": metadata + out, "displayTimeUnit": "ms", "otherData": other}


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Merge trace-rank<RRRRR>.json files into one Chrome trace with one "
                    "process per rank.")
    ap.add_argument("inputs", nargs="+", metavar="TRACE_DIR_OR_FILE",
                    help="a trace directory, or trace .json files")
    ap.add_argument("-o", "--output", required=True, metavar="merged.json",
                    help="the trace to write")
    args = ap.parse_args(argv)
    try:
        files = trace_files(args.inputs)
        merged = merge(files)
        tmp = args.output + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(merged, f, separators=(",", ":"))
                f.write("\n")
            os.replace(tmp, args.output)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise InputError(f"{args.output}: cannot write: {e.strerror}") from None
    except InputError as e:
        print(f"merge_traces.py: error: {e}", file=sys.stderr)
        return 2
    n = len(merged["traceEvents"])
    ranks = merged["otherData"]["ranks"]
    span_ms = max((ev["ts"] + (ev.get("dur") or 0) for ev in merged["traceEvents"]
                   if ev["ph"] != "M"), default=0) / 1e3
    print(f"{args.output}: {n} events from {len(ranks)} rank(s), {span_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
