"""The namespace cluster of tests/cluster/cluster.sh, from Python.

    with Cluster(3) as c:                  # hosts h1, h2, h3
        c.run("h1", ["hostname"])          # a command on a host
        c.mpirun(["-H", "h1:2,h2:2", "-n", "4", prog])   # ranks on the hosts
        c.kill("h2"); c.cut("h3"); c.heal("h3")

`down` runs when the block ends, however it ends (SIGTERM and SIGHUP, which
ctest and a closed terminal send, end the block like an exception); a
cluster whose owner (this process) died without it (SIGKILL) is removed by
the next `up`.

skip_unless_possible() prints "SKIPPED: <why>" and exits 0 where no cluster
can be made (not root, no network namespaces): ctest marks the test skipped
through SKIP_REGULAR_EXPRESSION, so it never passes silently.
"""

import os
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.realpath(__file__))
CLUSTER_SH = os.path.join(HERE, "cluster.sh")
ROOT = os.path.dirname(os.path.dirname(HERE))
MPIRUN = os.environ.get("MPIRUN", "mpirun")


def skip(reason):
    print("SKIPPED: " + reason, flush=True)
    sys.exit(0)


def skip_unless_possible():
    p = subprocess.run([CLUSTER_SH, "check"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    if p.returncode != 0:
        skip("no namespace cluster on this machine: " + p.stdout.strip())


def _exit_on_signal(signum, _frame):
    # Unwinds the `with` blocks, so that their clusters are taken down.
    raise SystemExit(128 + signum)


class Cluster:
    def __init__(self, hosts):
        self.n = hosts
        self.dir = None

    # -- lifetime ----------------------------------------------------------
    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _exit_on_signal)
        p = subprocess.run([CLUSTER_SH, "up", str(self.n), "--owner", str(os.getpid())],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise RuntimeError("cluster.sh up %d failed: %s" % (self.n, p.stderr.strip()))
        self.dir = p.stdout.strip().splitlines()[-1]
        self.env = dict(os.environ, DTRAIN_CLUSTER_DIR=self.dir)
        with open(os.path.join(self.dir, "subnet")) as f:
            self.subnet = f.read().strip()
        with open(os.path.join(self.dir, "id")) as f:
            self.id = f.read().strip()
        print("cluster %s: %d hosts on %s.0/24 (%s)" % (self.id, self.n, self.subnet, self.dir),
              flush=True)
        return self

    def __exit__(self, *exc):
        self.down()
        return False

    def down(self):
        if self.dir:
            subprocess.run([CLUSTER_SH, "down", self.dir])
            self.dir = None

    # -- hosts -------------------------------------------------------------
    @property
    def hosts(self):
        return ["h%d" % i for i in range(1, self.n + 1)]

    def address(self, host):
        return "%s.%d" % (self.subnet, int(host[1:]))

    def netns(self, host):
        return "dtc%s-%s" % (self.id, host)

    def _sh(self, *args, check=True):
        p = subprocess.run([CLUSTER_SH] + list(args), env=self.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if check and p.returncode != 0:
            raise RuntimeError("cluster.sh %s failed: %s" % (" ".join(args), p.stdout.strip()))
        return p.stdout

    def run(self, host, cmd, **kw):
        """subprocess.run of `cmd` on `host` (output captured as text)."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        kw.setdefault("text", True)
        return subprocess.run([CLUSTER_SH, "exec", host] + list(cmd), env=self.env, **kw)

    def popen(self, host, cmd, **kw):
        return subprocess.Popen([CLUSTER_SH, "exec", host] + list(cmd), env=self.env, **kw)

    def pids(self, host):
        """Processes on a host, its holder left out."""
        with open(os.path.join(self.dir, host + ".pid")) as f:
            holder = f.read().strip()
        out = subprocess.run(["ip", "netns", "pids", self.netns(host)], stdout=subprocess.PIPE,
                             text=True).stdout.split()
        return [int(p) for p in out if p != holder]

    def kill(self, host):
        self._sh("kill", host)

    def cut(self, host):
        self._sh("cut", host)

    def heal(self, host):
        self._sh("heal", host)

    # -- Open MPI ----------------------------------------------------------
    def mpirun_args(self):
        """The flags that make mpirun start ranks on the hosts (one per line from cluster.sh)."""
        return self._sh("mpirun-args").split("\n")[:-1]

    def mpirun_cmd(self, args):
        root = ["--allow-run-as-root"] if os.getuid() == 0 else []
        return [MPIRUN] + root + ["--bind-to", "none"] + self.mpirun_args() + list(args)

    def mpirun(self, args, timeout=600, **kw):
        cmd = self.mpirun_cmd(args)
        print("$ " + " ".join(cmd), flush=True)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        kw.setdefault("text", True)
        return subprocess.run(cmd, env=self.env, timeout=timeout, **kw)
