#!/usr/bin/python3
"""Module boundaries that the compiler does not check.

The include graph keeps the layering of DESIGN.md: dependencies point one way.

  env, memory, types, errors  <-  collectives (backends, algorithms)  <-  runtime
                          collectives  <-  data, checkpoint, parallel

The runtime creates communicators, so it sits on top of collectives: nothing
in src/collectives/ (nor the public collectives headers, nor data,
checkpoint or parallel) includes dtrain/runtime.h or src/runtime/, and the
runtime reaches the MPI backend only through its entry header,
src/collectives/mpi/mpi_backend.h. Nothing in the library includes examples/.

The process environment is read (and written) in one module,
src/runtime/env.cpp (dtrain/env.h), which lists every variable: no other
source of the library, its tools, examples or benchmarks calls getenv.
"""

import os
import re
import unittest

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
RUNTIME_HEADERS = ("dtrain/runtime.h",)
MPI_BACKEND_ENTRY = "src/collectives/mpi/mpi_backend.h"
ENV_MODULE = "src/runtime/env.cpp"
ENV_CALL = re.compile(r"\b(getenv|secure_getenv|setenv|unsetenv|putenv|clearenv)\s*\(")


def sources(*folders):
    for folder in folders:
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".h", ".cpp", ".cu")):
                    yield os.path.relpath(os.path.join(base, name), ROOT)


def includes(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return INCLUDE.findall(f.read())


class ModuleBoundaries(unittest.TestCase):
    def test_the_sources_are_found(self):
        files = list(sources("src/collectives", "src/runtime"))
        self.assertIn("src/runtime/runtime.cpp", files)
        self.assertIn(MPI_BACKEND_ENTRY, files)

    def test_nothing_below_the_runtime_includes_it(self):
        below = sources("src/collectives", "src/data", "src/checkpoint", "src/parallel",
                        "include/dtrain/collectives", "include/dtrain/data",
                        "include/dtrain/checkpoint", "include/dtrain/parallel")
        offenders = [f"{path}: {inc}" for path in below for inc in includes(path)
                     if inc in RUNTIME_HEADERS or inc.startswith("src/runtime/")]
        self.assertEqual(offenders, [], "the runtime sits on top of collectives, data, "
                         "checkpoint and parallel; pass what they need (LaunchInfo, options) "
                         "from dtrain/env.h or as arguments instead")

    def test_the_bottom_modules_include_no_runtime_or_backend(self):
        bottom = ("include/dtrain/env.h", "src/runtime/env.cpp",
                  "include/dtrain/memory.h", "src/runtime/memory.cpp")
        offenders = [f"{path}: {inc}" for path in bottom
                     for inc in includes(path)
                     if inc in RUNTIME_HEADERS or inc.startswith("src/")]
        self.assertEqual(offenders, [])

    def test_the_runtime_uses_only_the_mpi_backends_entry_header(self):
        offenders = [f"{path}: {inc}" for path in sources("src/runtime")
                     for inc in includes(path)
                     if inc.startswith("src/collectives/") and inc != MPI_BACKEND_ENTRY]
        self.assertEqual(offenders, [], f"the runtime reaches the MPI backend through "
                         f"{MPI_BACKEND_ENTRY} only")
        self.assertIn(MPI_BACKEND_ENTRY, includes("src/runtime/runtime.cpp"))

    def test_the_library_includes_no_example(self):
        offenders = [f"{path}: {inc}" for path in sources("src", "include")
                     for inc in includes(path) if inc.startswith("examples/")]
        self.assertEqual(offenders, [])

    def test_only_the_env_module_touches_the_environment(self):
        offenders = []
        for path in sources("src", "include", "examples", "benchmarks"):
            if path == ENV_MODULE:
                continue
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    code = line.split("//", 1)[0]
                    if ENV_CALL.search(code):
                        offenders.append(f"{path}:{number}: {line.strip()}")
        self.assertEqual(offenders, [], f"read the environment through dtrain/env.h "
                         f"({ENV_MODULE}) and list the variable in docs/configuration.md")
        with open(os.path.join(ROOT, ENV_MODULE), encoding="utf-8") as f:
            self.assertRegex(f.read(), ENV_CALL)


if __name__ == "__main__":
    unittest.main()
