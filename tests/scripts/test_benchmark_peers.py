#!/usr/bin/python3
"""The comparison benchmarks (benchmarks/run_ddp_comparison.sh,
run_trainer_comparison.sh) run PyTorch as the peer. With a Python that has
no torch they must say how to install it, first, instead of a traceback.

The Python without torch is the real interpreter with a `torch` package on
PYTHONPATH that fails to import, so the test means the same on a machine
that has python3-torch installed.
"""

import os
import stat
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SCRIPTS = ["run_ddp_comparison.sh", "run_trainer_comparison.sh"]


class BenchmarkPeers(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        fake = os.path.join(self.tmp.name, "fake", "torch")
        os.makedirs(fake)
        with open(os.path.join(fake, "__init__.py"), "w") as f:
            f.write("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
        self.python = os.path.join(self.tmp.name, "python-without-torch")
        with open(self.python, "w") as f:
            f.write("#!/bin/sh\nPYTHONPATH=%s exec %s \"$@\"\n"
                    % (os.path.dirname(fake), sys.executable))
        os.chmod(self.python, stat.S_IRWXU)
        # An empty build directory: the check must come before anything else.
        self.build = os.path.join(self.tmp.name, "build")
        os.makedirs(self.build)

    def tearDown(self):
        self.tmp.cleanup()

    def test_the_fake_python_has_no_torch(self):
        p = subprocess.run([self.python, "-c", "import torch"], capture_output=True, text=True)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("No module named 'torch'", p.stderr)

    def test_scripts_say_how_to_install_pytorch(self):
        for script in SCRIPTS:
            with self.subTest(script=script):
                env = dict(os.environ, PYTHON=self.python, BUILD_DIR=self.build)
                p = subprocess.run([os.path.join(ROOT, "benchmarks", script)], env=env,
                                   capture_output=True, text=True, timeout=60)
                out = p.stdout + p.stderr
                self.assertEqual(p.returncode, 1, out)
                self.assertNotIn("Traceback", out)
                self.assertIn("PyTorch is not installed for " + self.python, out)
                self.assertIn("python3-torch", out)
                self.assertIn("scripts/setup.sh --with-peers", out)
                self.assertNotIn("==", out, "something ran before the check")


if __name__ == "__main__":
    unittest.main(verbosity=2)
