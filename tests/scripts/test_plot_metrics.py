#!/usr/bin/python3
"""Tests of scripts/plot_metrics.py on synthetic metrics of two ranks, one of
them with a resumed run that repeats steps."""

import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts",
                      "plot_metrics.py")
T0 = 1764000000.0

# The expected summaries. Rank 0 keeps steps 0-11; the first run's steps 6
# and 7 (images_per_s 10000) are replaced by the resumed run's, so the mean
# of 800 + 10 * step over steps 0-11 is 855.0. Rank 1 has 400 + 10 * step.
SUMMARY_RANK0 = "rank 0: 12 steps (0-11), 2 run(s), last eval accuracy 0.8750 (step 11), " \
                "mean 855.0 images/s"
SUMMARY_RANK1 = "rank 1: 12 steps (0-11), 2 run(s), last eval accuracy 0.8750 (step 11), " \
                "mean 455.0 images/s"


def train(rank, step, ips, loss=None, timing=True):
    rec = {"kind": "train", "rank": rank, "step": step, "epoch": step // 4,
           "time": T0 + step, "loss": 2.0 / (1 + step) if loss is None else loss,
           "accuracy": min(1.0, 0.1 + 0.07 * step), "lr": 0.05, "images_per_s": ips}
    if timing:
        rec.update({"step_s": 0.16, "forward_s": 0.05, "backward_s": 0.08, "optimizer_s": 0.01,
                    "comm_exposed_s": 0.004, "data_wait_s": 0.001})
    return rec


def run(rank, resumed_from):
    return {"kind": "run", "rank": rank, "world_size": 2, "resumed_from_step": resumed_from,
            "config": {"batch_size": 128, "lr": 0.05}, "time": T0}


def evaluation(rank, step, accuracy, loss):
    return {"kind": "eval", "rank": rank, "step": step, "epoch": step // 4, "time": T0 + step,
            "loss": loss, "accuracy": accuracy, "samples": 10000}


def rank_records(rank, base_ips):
    """First run: steps 0-7, eval at 3 and 7, checkpoint after step 5, crash
    after step 7. Second run resumes from step 6: steps 6-11, eval at 7 and 11."""
    recs = [run(rank, None)]
    for s in range(8):
        bad = s >= 6  # repeated below: these must lose
        recs.append(train(rank, s, 10000.0 if bad else base_ips + 10 * s,
                          loss=99.0 if bad else None))
        if s == 3:
            recs.append(evaluation(rank, 3, 0.5, 1.2))
        if s == 5:
            recs.append({"kind": "checkpoint", "rank": rank, "step": 5, "time": T0 + 5,
                         "stall_s": 0.02, "path": "ckpt/step-5"})
        if s == 7:
            recs.append(evaluation(rank, 7, 0.11, 9.0))
    recs.append(run(rank, 6))
    for s in range(6, 12):
        recs.append(train(rank, s, base_ips + 10 * s))
        if s == 7:
            recs.append(evaluation(rank, 7, 0.75, 0.6))
    recs.append(evaluation(rank, 11, 0.875, 0.4))
    return recs


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise AssertionError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


class PlotMetricsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise AssertionError(
                f"matplotlib is missing for {sys.executable}: these tests need it "
                f"(Debian: apt-get install python3-matplotlib)") from None

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = os.path.join(self.tmp.name, "metrics")
        os.mkdir(self.dir)
        self.env = dict(os.environ, MPLCONFIGDIR=os.path.join(self.tmp.name, "mpl"))
        write_jsonl(self.file(0), rank_records(0, 800.0))
        write_jsonl(self.file(1), rank_records(1, 400.0))

    def tearDown(self):
        self.tmp.cleanup()

    def file(self, rank):
        return os.path.join(self.dir, f"metrics-rank{rank:05d}.jsonl")

    def plot(self, *args):
        return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                              env=self.env, timeout=120)

    def assert_plotted(self, res, png, summary):
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertEqual(res.stdout.strip(), summary)
        self.assertGreater(os.path.getsize(png), 10000)
        width, height = png_size(png)
        self.assertGreater(width, 800)
        self.assertGreater(height, 600)
        self.assertFalse([f for f in os.listdir(os.path.dirname(png)) if "tmp" in f])

    def assert_error(self, res, *fragments):
        self.assertEqual(res.returncode, 2, f"stdout: {res.stdout}\nstderr: {res.stderr}")
        self.assertIn("plot_metrics.py: error:", res.stderr)
        for frag in fragments:
            self.assertIn(frag, res.stderr)
        self.assertNotIn("Traceback", res.stderr)

    def test_script_is_executable(self):
        self.assertTrue(os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable")
        with open(SCRIPT, encoding="utf-8") as f:
            self.assertEqual(f.readline().strip(), "#!/usr/bin/python3")

    def test_directory_rank0_default(self):
        png = os.path.join(self.tmp.name, "out.png")
        self.assert_plotted(self.plot(self.dir, "-o", png), png, SUMMARY_RANK0)

    def test_directory_rank1(self):
        png = os.path.join(self.tmp.name, "out1.png")
        self.assert_plotted(self.plot(self.dir, "-o", png, "--rank", "1"), png, SUMMARY_RANK1)

    def test_files_filtered_by_rank(self):
        png = os.path.join(self.tmp.name, "files.png")
        res = self.plot(self.file(0), self.file(1), "--rank", "1", "-o", png)
        self.assert_plotted(res, png, SUMMARY_RANK1)

    def test_window_option(self):
        png = os.path.join(self.tmp.name, "w.png")
        self.assert_plotted(self.plot(self.dir, "-o", png, "--window", "3"), png, SUMMARY_RANK0)

    def test_no_eval_no_timing(self):
        write_jsonl(self.file(0), [run(0, None)] + [train(0, s, 100.0, timing=False)
                                                    for s in range(5)])
        png = os.path.join(self.tmp.name, "bare.png")
        res = self.plot(self.dir, "-o", png)
        self.assert_plotted(res, png, "rank 0: 5 steps (0-4), 1 run(s), last eval accuracy n/a, "
                                      "mean 100.0 images/s")

    def test_missing_directory(self):
        missing = os.path.join(self.tmp.name, "nope")
        self.assert_error(self.plot(missing, "-o", os.path.join(self.tmp.name, "x.png")),
                          missing, "no such file or directory")

    def test_directory_without_metrics(self):
        empty = os.path.join(self.tmp.name, "empty")
        os.mkdir(empty)
        self.assert_error(self.plot(empty, "-o", os.path.join(self.tmp.name, "x.png")),
                          empty, "no metrics files")

    def test_rank_without_file(self):
        self.assert_error(self.plot(self.dir, "--rank", "5", "-o",
                                    os.path.join(self.tmp.name, "x.png")),
                          "no metrics file for rank 5", "ranks present: 0, 1")

    def test_rank_without_records_in_files(self):
        self.assert_error(self.plot(self.file(0), "--rank", "1", "-o",
                                    os.path.join(self.tmp.name, "x.png")),
                          "no train or eval records for rank 1")

    def test_malformed_json_line(self):
        with open(self.file(0), "r+", encoding="utf-8") as f:
            lines = f.readlines()
            lines[2] = '{"kind": "train", "rank": 0, "step": 1, "loss": \n'
            f.seek(0)
            f.truncate()
            f.writelines(lines)
        self.assert_error(self.plot(self.dir, "-o", os.path.join(self.tmp.name, "x.png")),
                          f"{self.file(0)}:3: malformed line")

    def test_line_not_an_object(self):
        write_jsonl(self.file(0), rank_records(0, 800.0), extra_lines=["[1, 2]"])
        n = len(rank_records(0, 800.0)) + 1
        self.assert_error(self.plot(self.dir, "-o", os.path.join(self.tmp.name, "x.png")),
                          f"{self.file(0)}:{n}: malformed line (not a JSON object)")

    def test_line_without_kind(self):
        write_jsonl(self.file(1), [run(1, None), {"rank": 1, "step": 0}])
        self.assert_error(self.plot(self.file(1), "--rank", "1", "-o",
                                    os.path.join(self.tmp.name, "x.png")),
                          f"{self.file(1)}:2: malformed line (no \"kind\")")

    def test_train_record_without_loss(self):
        rec = train(0, 0, 100.0)
        del rec["loss"]
        write_jsonl(self.file(0), [run(0, None), rec])
        self.assert_error(self.plot(self.dir, "-o", os.path.join(self.tmp.name, "x.png")),
                          f"{self.file(0)}:2: train record has no 'loss'")

    def test_non_numeric_field(self):
        rec = train(0, 0, 100.0)
        rec["images_per_s"] = "fast"
        write_jsonl(self.file(0), [rec])
        self.assert_error(self.plot(self.dir, "-o", os.path.join(self.tmp.name, "x.png")),
                          f"{self.file(0)}:1: 'images_per_s' is not a number")

    def test_usage_error(self):
        res = self.plot(self.dir)  # no -o
        self.assertEqual(res.returncode, 2)
        self.assertRegex(res.stderr, re.compile(r"required.*-o", re.S))


if __name__ == "__main__":
    unittest.main(verbosity=2)
