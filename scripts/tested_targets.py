#!/usr/bin/python3
"""The build steps that a set of ctest entries needs, for a Ninja build.

    tested_targets.py BUILD_DIR [CTEST_ARGS...]

Prints, one a line, the Ninja targets (paths relative to BUILD_DIR) of the
programs that the ctest entries selected by CTEST_ARGS (for example
`-L 'unit|mpi'`) run: those in their commands, and those their environment
names (DTRAIN_RESNET=.../dtrain-resnet). Ninja builds each with everything it
depends on, and nothing else: no benchmark that no selected test runs, no
header example. Works on a configured build directory before anything is
built (ctest leaves a command out of its listing while the program is
missing, so the commands are read from the CTestTestfile.cmake files).

`scripts/build.sh` uses it when DTRAIN_BUILD_FOR_TESTS is set.
Exit status: 0, or 2 when BUILD_DIR is not a configured Ninja build.
"""

import json
import os
import re
import subprocess
import sys

# add_test(NAME ...) and set_tests_properties(NAME ...) in CTestTestfile.cmake;
# CMake writes the name as [=[NAME]=] (3.18 and later) or bare.
TEST_LINE = re.compile(r"^\s*(?:add_test|set_tests_properties)\(\s*(?:\[=\[(.*?)\]=\]|(\S+))\s")


def fail(message):
    sys.stderr.write("tested_targets: %s\n" % message)
    sys.exit(2)


def run(command, cwd):
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        fail("%s failed: %s" % (" ".join(command), done.stderr.strip()))
    return done.stdout


def selected_tests(build, ctest_args):
    listing = json.loads(run(["ctest", "--show-only=json-v1", *ctest_args], build))
    return {test["name"] for test in listing.get("tests", [])}


def ninja_outputs(build):
    text = run(["ninja", "-t", "targets", "all"], build)
    return {line.rsplit(": ", 1)[0] for line in text.splitlines() if ": " in line}


def paths_named(build, names):
    """Every quoted or ;-separated absolute path under BUILD in the lines of the named tests."""
    path = re.compile(re.escape(build) + r"/[^\s\";=]+")
    found = set()
    for directory, _, files in os.walk(build):
        if "CTestTestfile.cmake" not in files:
            continue
        with open(os.path.join(directory, "CTestTestfile.cmake")) as f:
            for line in f:
                match = TEST_LINE.match(line)
                if match and (match.group(1) or match.group(2)) in names:
                    found.update(p[len(build) + 1:] for p in path.findall(line))
    return found


def main(argv):
    if len(argv) < 2:
        fail("usage: tested_targets.py BUILD_DIR [CTEST_ARGS...]")
    build = os.path.realpath(argv[1])
    if not os.path.isfile(os.path.join(build, "build.ninja")):
        fail("%s is not a configured Ninja build directory (no build.ninja)" % build)
    names = selected_tests(build, argv[2:])
    targets = paths_named(build, names) & ninja_outputs(build)
    for target in sorted(targets):
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
