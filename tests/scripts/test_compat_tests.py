#!/usr/bin/python3
"""The Debian 13 (trixie) test set (`scripts/compat/trixie.sh --print-tests`),
on this project's configured build directory (DTRAIN_TEST_BUILD_DIR):

- it leaves out only the 1-, 3- and 4-rank runs of the mpi programs, and runs
  every program that the unit and mpi tests run: the programs of the set (as
  scripts/tested_targets.py finds them) are those of its labels, which is what
  trixie.sh builds. A program that ran only at 1, 3 or 4 ranks would be built
  on Debian 13 and never run there; this test fails then.
- every multi-rank mpi program in it runs at 2 ranks.
"""

import json
import os
import re
import subprocess
import unittest

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
TRIXIE = os.path.join(ROOT, "scripts", "compat", "trixie.sh")
TESTED_TARGETS = os.path.join(ROOT, "scripts", "tested_targets.py")
BUILD = os.environ.get("DTRAIN_TEST_BUILD_DIR", "")


def run(command, cwd=None):
    p = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError("%s failed (exit %d): %s" % (" ".join(command), p.returncode, p.stderr))
    return p.stdout


class CompatTestSet(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.path.isfile(os.path.join(BUILD, "build.ninja")):
            raise AssertionError("DTRAIN_TEST_BUILD_DIR=%r is not a configured Ninja build" % BUILD)
        cls.args = run([TRIXIE, "--print-tests"]).splitlines()
        # The label regex the set selects by (and trixie.sh builds for).
        cls.labels = cls.args[cls.args.index("-L") + 1]

    def names(self, *ctest_args):
        listing = json.loads(run(["ctest", "--show-only=json-v1", *ctest_args], cwd=BUILD))
        return {t["name"] for t in listing["tests"]}

    def test_the_set_runs_every_program_its_labels_run(self):
        everything = run([TESTED_TARGETS, BUILD, "-L", self.labels]).split()
        in_the_set = run([TESTED_TARGETS, BUILD, *self.args]).split()
        self.assertTrue(everything)
        self.assertEqual(sorted(set(everything) - set(in_the_set)), [],
                         "built for the Debian 13 set but run by none of its entries")

    def test_only_runs_at_other_rank_counts_are_left_out(self):
        every = self.names("-L", self.labels)
        chosen = self.names(*self.args)
        self.assertTrue(chosen)
        for name in sorted(every - chosen):
            self.assertRegex(name, r"_np[134]$")
        # Each program run at several rank counts keeps its 2-rank run.
        for name in sorted(every - chosen):
            self.assertIn(re.sub(r"_np[134]$", "_np2", name), chosen, name)


if __name__ == "__main__":
    unittest.main(verbosity=2)
