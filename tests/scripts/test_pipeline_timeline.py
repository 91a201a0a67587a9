#!/usr/bin/python3
"""Tests of scripts/pipeline_timeline.py on synthetic traces of two ranks."""

import os
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts",
                      "pipeline_timeline.py")
HEADER = "rank,kind,stage,microbatch,start,end,wait,heap\n"


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


class PipelineTimelineTest(unittest.TestCase):
    def test_draws_the_step_and_prints_the_idle_fraction(self):
        with tempfile.TemporaryDirectory() as d:
            # GPipe, p = 2, m = 1, F = 1 s, B = 2 s: step 6, busy 6 of 12.
            rank0 = HEADER + "0,F,0,0,10,11,0,0\n0,sendF,0,0,11,11,0,0\n0,B,0,0,14,16,0,0\n"
            rank1 = HEADER + "1,F,1,0,11,12,0,0\n1,B,1,0,12,14,0,0\n1,reduce,1,-1,14,14,0,0\n"
            paths = []
            for i, text in enumerate((rank0, rank1)):
                paths.append(os.path.join(d, f"t-rank{i}.csv"))
                with open(paths[-1], "w") as f:
                    f.write(text)
            out = os.path.join(d, "step.png")
            r = run(*paths, "-o", out)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("2 ranks, step 6000.0 ms, idle fraction 0.5000", r.stdout)
            with open(out, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_draws_a_step_of_trainer_traces(self):
        import json
        with tempfile.TemporaryDirectory() as d:
            # Two steps of GPipe, p = 2, m = 1; step 2: F = 1 s, B = 2 s, busy 6 of 12.
            def event(rank, kind, stage, step, ts, dur):
                return {"name": kind, "ph": "X", "pid": rank, "tid": 0, "ts": ts * 1e6,
                        "dur": dur * 1e6, "args": {"step": step, "stage": stage, "microbatch": 0}}
            ranks = [[event(0, "F", 0, 1, 0, 5), event(0, "F", 0, 2, 10, 1),
                      event(0, "B", 0, 2, 14, 2),
                      {"name": "optimizer", "ph": "X", "pid": 0, "tid": 0, "ts": 17e6,
                       "dur": 1e6, "args": {"step": 2}}],
                     [event(1, "F", 1, 1, 5, 1), event(1, "F", 1, 2, 11, 1),
                      event(1, "B", 1, 2, 12, 2)]]
            paths = []
            for i, events in enumerate(ranks):
                paths.append(os.path.join(d, f"trace-rank{i:05d}.json"))
                with open(paths[-1], "w") as f:
                    json.dump({"traceEvents": events}, f)
            out = os.path.join(d, "step.png")
            r = run(*paths, "-o", out)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("2 ranks, step (training step 2) 6000.0 ms, idle fraction 0.5000",
                          r.stdout)
            r = run(*paths, "-o", out, "--step", "1")
            self.assertIn("step (training step 1) 6000.0 ms", r.stdout)
            r = run(*paths, "-o", out, "--step", "7")
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("step 7 is not in every trace", r.stderr)

    def test_a_file_that_is_not_a_trace_is_refused(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "x.csv")
            with open(path, "w") as f:
                f.write("a,b\n1,2\n")
            r = run(path, "-o", os.path.join(d, "x.png"))
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("not a pipeline trace", r.stderr)


if __name__ == "__main__":
    unittest.main()
