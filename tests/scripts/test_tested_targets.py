#!/usr/bin/python3
"""scripts/tested_targets.py, on a small CMake project of its own: it lists
the programs that the selected ctest entries run, in their commands or named
in their environment, and nothing that only other tests (or no test) run.
The project's "programs" are files made by custom commands, so no compiler
is needed; the build is configured and never built, as in scripts/build.sh.
"""

import os
import subprocess
import tempfile
import unittest

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SCRIPT = os.path.join(ROOT, "scripts", "tested_targets.py")

PROJECT = """
cmake_minimum_required(VERSION 3.22)
project(tested_targets_check NONE)
enable_testing()
foreach(p run_by_unit named_by_mpi run_by_cluster not_tested)
  add_custom_command(OUTPUT ${CMAKE_BINARY_DIR}/bin/${p} COMMAND ${CMAKE_COMMAND} -E touch bin/${p})
  add_custom_target(${p} ALL DEPENDS ${CMAKE_BINARY_DIR}/bin/${p})
endforeach()
add_test(NAME a_unit_test COMMAND ${CMAKE_BINARY_DIR}/bin/run_by_unit --flag)
set_tests_properties(a_unit_test PROPERTIES LABELS unit)
add_test(NAME an_mpi_test COMMAND /usr/bin/true)
set_tests_properties(an_mpi_test PROPERTIES LABELS "mpi;fault"
  ENVIRONMENT "A=1;PROGRAM=${CMAKE_BINARY_DIR}/bin/named_by_mpi")
add_test(NAME a_cluster_test COMMAND ${CMAKE_BINARY_DIR}/bin/run_by_cluster)
set_tests_properties(a_cluster_test PROPERTIES LABELS cluster)
"""


class TestedTargets(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        source = os.path.join(cls.tmp.name, "source")
        cls.build = os.path.join(cls.tmp.name, "build")
        os.makedirs(source)
        with open(os.path.join(source, "CMakeLists.txt"), "w") as f:
            f.write(PROJECT)
        subprocess.run(["cmake", "-S", source, "-B", cls.build, "-G", "Ninja"], check=True,
                       capture_output=True)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def targets(self, *ctest_args):
        p = subprocess.run([SCRIPT, self.build, *ctest_args], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        return p.stdout.split()

    def test_the_programs_of_the_selected_labels(self):
        self.assertEqual(self.targets("-L", "unit|mpi"), ["bin/named_by_mpi", "bin/run_by_unit"])

    def test_one_test_by_name(self):
        self.assertEqual(self.targets("-R", "a_cluster_test"), ["bin/run_by_cluster"])

    def test_nothing_selected(self):
        self.assertEqual(self.targets("-L", "no_such_label"), [])

    def test_an_unconfigured_directory_is_an_error(self):
        p = subprocess.run([SCRIPT, self.tmp.name], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn("not a configured Ninja build directory", p.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
