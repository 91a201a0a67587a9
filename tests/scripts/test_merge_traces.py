#!/usr/bin/python3
"""Tests of scripts/merge_traces.py on synthetic traces of two ranks."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts",
                      "merge_traces.py")
# Microseconds since the epoch; rank 1 starts 250 us before rank 0, so the
# offset comes from rank 1.
T0 = 1764000000123456.5
OFFSET = T0 - 250.0


def ev(name, rank, ts, dur, tid=0, cat="step", **args):
    return {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "pid": rank, "tid": tid,
            "args": args}


def rank_events(rank, start):
    """Two steps, written out of time order (as a trainer writing events when
    they end would), plus an eval and a checkpoint, and the file's own
    process_name, which the merge replaces."""
    out = [{"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
            "args": {"name": "trainer-from-file"}}]
    t = start
    for step in range(2):
        out.append(ev("data wait", rank, t, 10.0, step=step))
        out.append(ev("allreduce bucket 1", rank, t + 120.0, 30.0, tid=1, cat="comm",
                      step=step, bucket=1, bytes=4096))
        out.append(ev("allreduce bucket 0", rank, t + 150.0, 40.0, tid=1, cat="comm",
                      step=step, bucket=0, bytes=8192))
        out.append(ev("forward", rank, t + 10.0, 50.0, step=step))
        out.append(ev("backward", rank, t + 60.0, 100.0, step=step))
        out.append(ev("optimizer", rank, t + 195.0, 5.0, step=step))
        t += 200.0
    out.append(ev("checkpoint save", rank, t, 300.0, step=2))
    out.append(ev("eval", rank, t + 300.0, 1000.0, step=2, accuracy=0.9))
    return out


def write_trace(path, rank, start, world_size=2, events=None):
    doc = {"traceEvents": rank_events(rank, start) if events is None else events,
           "displayTimeUnit": "ms",
           "otherData": {"rank": rank, "world_size": world_size, "clock": "unix_us"}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    return doc


class MergeTracesTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = os.path.join(self.tmp.name, "traces")
        os.mkdir(self.dir)
        self.inputs = {0: write_trace(self.file(0), 0, T0),
                       1: write_trace(self.file(1), 1, T0 - 250.0)}
        self.out = os.path.join(self.tmp.name, "merged.json")

    def tearDown(self):
        self.tmp.cleanup()

    def file(self, rank, directory=None):
        return os.path.join(directory or self.dir, f"trace-rank{rank:05d}.json")

    def merge(self, *args):
        return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                              timeout=120)

    def merged(self, *inputs):
        res = self.merge(*inputs, "-o", self.out)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertIn("from 2 rank(s)", res.stdout)
        with open(self.out, encoding="utf-8") as f:
            return json.load(f)

    def assert_error(self, res, *fragments):
        self.assertEqual(res.returncode, 2, f"stdout: {res.stdout}\nstderr: {res.stderr}")
        self.assertIn("merge_traces.py: error:", res.stderr)
        for frag in fragments:
            self.assertIn(frag, res.stderr)
        self.assertNotIn("Traceback", res.stderr)
        self.assertFalse(os.path.exists(self.out))

    def check_structure(self, doc):
        events = doc["traceEvents"]
        meta = [e for e in events if e["ph"] == "M"]
        timed = [e for e in events if e["ph"] != "M"]

        # Metadata first, then the events.
        self.assertEqual(events[:len(meta)], meta)

        # One process per rank, named and sorted.
        names = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
        self.assertEqual(names, {0: "rank 0", 1: "rank 1"})
        self.assertEqual(len([e for e in meta if e["name"] == "process_name"]), 2)
        sort = {e["pid"]: e["args"]["sort_index"] for e in meta
                if e["name"] == "process_sort_index"}
        self.assertEqual(sort, {0: 0, 1: 1})
        threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta
                   if e["name"] == "thread_name"}
        self.assertEqual(threads, {(0, 0): "compute", (0, 1): "communication",
                                   (1, 0): "compute", (1, 1): "communication"})
        self.assertEqual({e["pid"] for e in timed}, {0, 1})

        # Sorted and shifted.
        ts = [e["ts"] for e in timed]
        self.assertEqual(ts, sorted(ts))
        self.assertEqual(ts[0], 0)
        self.assertEqual(timed[0]["pid"], 1)
        self.assertEqual(doc["otherData"]["ts_offset_us"], OFFSET)
        self.assertEqual(doc["otherData"]["clock"], "unix_us")
        self.assertEqual(doc["otherData"]["ranks"], [0, 1])
        self.assertEqual(doc["otherData"]["world_size"], 2)
        self.assertEqual(doc["displayTimeUnit"], "ms")

        # Every input event is there once, moved by the offset, otherwise
        # unchanged.
        def key(e):
            return (e["pid"], e["name"], e["args"].get("step"))
        expected = {}
        for rank, src in self.inputs.items():
            for e in src["traceEvents"]:
                if e["ph"] != "M":
                    expected[key(e)] = e
        self.assertEqual(len(timed), len(expected))
        self.assertEqual(len({key(e) for e in timed}), len(timed))
        for e in timed:
            orig = expected[key(e)]
            self.assertAlmostEqual(e["ts"] + OFFSET, orig["ts"], delta=0.002)
            for field in ("name", "cat", "ph", "dur", "tid", "args"):
                self.assertEqual(e[field], orig[field])

    def test_script_is_executable(self):
        self.assertTrue(os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable")
        with open(SCRIPT, encoding="utf-8") as f:
            self.assertEqual(f.readline().strip(), "#!/usr/bin/python3")

    def test_directory(self):
        self.check_structure(self.merged(self.dir))

    def test_files(self):
        doc = self.merged(self.file(1), self.file(0))
        self.check_structure(doc)
        self.assertNotIn("trainer-from-file", json.dumps(doc))

    def test_concurrent_events_on_one_time_line(self):
        doc = self.merged(self.dir)
        timed = [e for e in doc["traceEvents"] if e["ph"] != "M"]
        fwd = {e["pid"]: e["ts"] for e in timed
               if e["name"] == "forward" and e["args"]["step"] == 0}
        self.assertEqual(fwd, {1: 10.0, 0: 260.0})

    def test_rank_from_file_name(self):
        events = rank_events(3, T0)
        with open(self.file(3), "w", encoding="utf-8") as f:
            json.dump({"traceEvents": events}, f)
        res = self.merge(self.file(3), self.file(1), "-o", self.out)
        self.assertEqual(res.returncode, 0, res.stderr)
        with open(self.out, encoding="utf-8") as f:
            doc = json.load(f)
        self.assertEqual(doc["otherData"]["ranks"], [1, 3])

    def test_missing_rank_warns(self):
        write_trace(self.file(0), 0, T0, world_size=3)
        write_trace(self.file(1), 1, T0, world_size=3)
        res = self.merge(self.dir, "-o", self.out)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertIn("warning: no trace for rank(s) 2 of world size 3", res.stderr)

    def test_missing_file(self):
        missing = os.path.join(self.tmp.name, "trace-rank00007.json")
        self.assert_error(self.merge(self.file(0), missing, "-o", self.out),
                          missing, "no such file or directory")

    def test_directory_without_traces(self):
        empty = os.path.join(self.tmp.name, "empty")
        os.mkdir(empty)
        self.assert_error(self.merge(empty, "-o", self.out), empty, "no trace files")

    def test_not_json(self):
        with open(self.file(1), "w", encoding="utf-8") as f:
            f.write('{"traceEvents": [{"name": "forward",')
        self.assert_error(self.merge(self.dir, "-o", self.out), self.file(1), "not JSON")

    def test_no_trace_events(self):
        with open(self.file(0), "w", encoding="utf-8") as f:
            json.dump({"events": []}, f)
        self.assert_error(self.merge(self.dir, "-o", self.out), self.file(0),
                          'no "traceEvents"')

    def test_json_array_is_not_a_trace_here(self):
        with open(self.file(0), "w", encoding="utf-8") as f:
            json.dump([1, 2], f)
        self.assert_error(self.merge(self.dir, "-o", self.out), self.file(0),
                          'no "traceEvents"')

    def test_trace_events_not_a_list(self):
        with open(self.file(0), "w", encoding="utf-8") as f:
            json.dump({"traceEvents": {"name": "forward"}}, f)
        self.assert_error(self.merge(self.dir, "-o", self.out), '"traceEvents" is not a list')

    def test_event_without_ts(self):
        events = rank_events(0, T0)
        del events[3]["ts"]
        write_trace(self.file(0), 0, T0, events=events)
        self.assert_error(self.merge(self.dir, "-o", self.out),
                          f"{self.file(0)}: traceEvents[3]: no numeric \"ts\"")

    def test_complete_event_without_dur(self):
        events = rank_events(1, T0)
        del events[2]["dur"]
        write_trace(self.file(1), 1, T0, events=events)
        self.assert_error(self.merge(self.dir, "-o", self.out),
                          f"{self.file(1)}: traceEvents[2]: complete event")

    def test_same_rank_twice(self):
        self.assert_error(self.merge(self.file(0), self.file(0), "-o", self.out),
                          "rank 0 again")

    def test_no_events_at_all(self):
        write_trace(self.file(0), 0, T0, events=[])
        write_trace(self.file(1), 1, T0, events=[])
        self.assert_error(self.merge(self.dir, "-o", self.out), "no events")

    def test_other_clock(self):
        with open(self.file(0), "w", encoding="utf-8") as f:
            json.dump({"traceEvents": rank_events(0, 5.0),
                       "otherData": {"rank": 0, "clock": "steady_us"}}, f)
        self.assert_error(self.merge(self.dir, "-o", self.out), "steady_us")


if __name__ == "__main__":
    unittest.main(verbosity=2)
