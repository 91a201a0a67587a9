#!/usr/bin/python3
"""Tests on the namespace cluster (tests/cluster/cluster.sh): several hosts
on this machine, each with its own network, hostname and /dev/shm.

    cluster_test.py CASE        (see CASES at the bottom; one ctest entry each)

Where no cluster can be made (not root, no network namespaces) every case
prints "SKIPPED: <why>" and exits 0, which ctest reports as skipped.

Environment (set by ctest): DTRAIN_ALLREDUCE_PERF, DTRAIN_MPI_COLLECTIVES;
MPIRUN (optional).
"""
import os
import re
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, HERE)
from cluster import Cluster, skip_unless_possible  # noqa: E402


def fail(message, output=None):
    if output:
        print(output)
    print("FAIL: " + message, flush=True)
    sys.exit(1)


def binary(var):
    path = os.environ.get(var)
    if not path or not os.access(path, os.X_OK):
        fail("%s is not set to an executable (ctest sets it)" % var)
    return path


def links_of(cluster_id):
    out = subprocess.run(["ip", "-o", "link", "show"], stdout=subprocess.PIPE, text=True).stdout
    return [line for line in out.splitlines() if "dtc" + cluster_id in line or
            "dtcb" + cluster_id in line]


def netns_of(cluster_id):
    out = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, text=True).stdout
    return [line for line in out.splitlines() if line.startswith("dtc" + cluster_id)]


# A TCP server on a host that answers one connection with its hostname.
SERVE = ("import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
         "socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 7077)); s.listen(); print('ready', "
         "flush=True); c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()")
ASK = ("import socket, sys; s = socket.create_connection((sys.argv[1], 7077), timeout=%g); "
       "print(s.recv(64).decode())")


def ask(c, src, dst, timeout=5.0):
    """Connects from host `src` to the server on `dst`; returns its answer or None."""
    p = c.run(src, ["/usr/bin/python3", "-c", ASK % timeout, c.address(dst)], timeout=timeout + 10)
    return p.stdout.strip() if p.returncode == 0 else None


def serve(c, host):
    p = c.popen(host, ["/usr/bin/python3", "-c", SERVE], stdout=subprocess.PIPE, text=True)
    if p.stdout.readline().strip() != "ready":
        fail("the test server on %s did not start" % host)
    return p


# --- the cases ----------------------------------------------------------------

def case_namespaces():
    """Hosts with their own hostname, address and /dev/shm; TCP between them
    over the bridge; cut/heal/kill do what they say; down removes everything,
    and a second cluster right after gets new names."""
    ids = []
    for _ in range(2):
        with Cluster(3) as c:
            ids.append(c.id)
            names = [c.run(h, ["hostname"]).stdout.strip() for h in c.hosts]
            if names != c.hosts:
                fail("hostnames inside the hosts: %s" % names)
            if socket.gethostname() in names:
                fail("a host has this machine's hostname")
            for h in c.hosts:
                out = c.run(h, ["ip", "-4", "-o", "addr", "show"]).stdout
                addrs = re.findall(r"inet (\S+)/", out)
                if sorted(addrs) != sorted(["127.0.0.1", c.address(h)]):
                    fail("addresses on %s: %s" % (h, addrs))
                routes = c.run(h, ["ip", "-4", "route", "show"]).stdout
                if "default" in routes:
                    fail("%s has a default route: %s" % (h, routes))
            # Each host has its own /dev/shm and /tmp; the rest is shared.
            for d in ("/dev/shm", "/tmp"):
                c.run("h1", ["sh", "-c", "echo x > %s/dtrain-cluster-probe" % d])
                if c.run("h2", ["test", "-e", d + "/dtrain-cluster-probe"]).returncode == 0:
                    fail("h2 sees h1's " + d)
                if os.path.exists(d + "/dtrain-cluster-probe"):
                    fail("this machine sees h1's " + d)
            if c.run("h2", ["test", "-e", os.path.join(c.dir, "hosts")]).returncode != 0:
                fail("h2 does not see the cluster's directory " + c.dir)
            server = serve(c, "h2")
            if ask(c, "h1", "h2") != "h2":
                fail("h1 could not reach h2 over TCP")
            server.wait(timeout=10)
            # A cut link: nothing gets through, the rsh agent refuses; healed, it works.
            server = serve(c, "h2")
            c.cut("h2")
            if ask(c, "h1", "h2", timeout=2) is not None:
                fail("h1 reached h2 through a cut link")
            p = subprocess.run([os.path.join(os.path.dirname(__file__), "cluster-rsh"), "h2",
                                "true"], env=c.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
            if p.returncode != 255 or "h2" not in p.stdout:
                fail("the rsh agent reached a cut host (exit %d: %s)" % (p.returncode, p.stdout))
            c.heal("h2")
            if ask(c, "h1", "h2", timeout=10) != "h2":
                fail("h1 could not reach h2 after heal")
            server.wait(timeout=10)
            # kill: every process of h2 ends at once; h1's keep running.
            sleepers = {h: c.popen(h, ["sleep", "300"]) for h in ("h1", "h2")}
            deadline = time.time() + 10
            while not all(c.pids(h) for h in ("h1", "h2")) and time.time() < deadline:
                time.sleep(0.05)
            c.kill("h2")
            if sleepers["h2"].wait(timeout=10) != -9:
                fail("the process on h2 was not killed")
            if c.pids("h2"):
                fail("processes left on h2 after kill: %s" % c.pids("h2"))
            if sleepers["h1"].poll() is not None:
                fail("kill h2 ended a process of h1")
            sleepers["h1"].kill()
            sleepers["h1"].wait()
            directory = c.dir
        if links_of(ids[-1]) or netns_of(ids[-1]) or os.path.exists(directory):
            fail("down left %s %s %s" % (links_of(ids[-1]), netns_of(ids[-1]), directory))
    if ids[0] == ids[1]:
        fail("two clusters in a row got the same id %s" % ids[0])
    print("ok: hosts, TCP, /dev/shm, cut/heal, kill and down (clusters %s)" % ", ".join(ids))


def allreduce(hosts, per_host, algos):
    perf = binary("DTRAIN_ALLREDUCE_PERF")
    with Cluster(hosts) as c:
        spec = ",".join("%s:%d" % (h, per_host) for h in c.hosts)
        ranks = hosts * per_host
        # 8 B to 4 MiB: latency-bound sizes, the TCP eager limit (64 KiB) and beyond.
        p = c.mpirun(["-H", spec, "-n", str(ranks), perf, "-b", "8", "-e", "4M", "-f", "8",
                      "-w", "1", "-n", "3", "--algo", algos], timeout=600)
        print(p.stdout)
        if p.returncode != 0 or "out of bounds values: 0 OK" not in p.stdout:
            fail("allreduce_perf failed or computed wrong values (exit %d)" % p.returncode)
        where = "%d ranks on %d hosts (%s)" % (ranks, hosts, ", ".join(
            "%s: %d" % (h, per_host) for h in c.hosts))
        if where not in p.stdout:
            fail("the ranks did not run where asked: expected '%s'" % where)
        ran = re.search(r"^# auto ran: (.*)$", p.stdout, re.M)
        if not ran:
            fail("allreduce_perf did not say what auto ran")
        if "shm" in ran.group(1):
            fail("auto picked shm with ranks on several hosts: " + ran.group(1))
        return ran.group(1)


def case_allreduce_2x2():
    """allreduce_perf on 2 hosts x 2 ranks: correct, auto never picks shm
    and picks hier."""
    ran = allreduce(2, 2, "ring,rhd,hier,native,auto")
    if "hier" not in ran:
        fail("auto never picked hier with 2 ranks on each host: " + ran)


def case_allreduce_4x1():
    """allreduce_perf on 4 hosts x 1 rank: hier has nothing to do there."""
    ran = allreduce(4, 1, "ring,rhd,native,auto")
    if "hier" in ran:
        fail("auto picked hier with one rank per host: " + ran)


def case_collectives_2x2():
    """The collectives matrix (tests/mpi/collectives_test.cpp: every
    algorithm, dtype and op; 0, 1, 7 and 401 elements and 1 MiB, on both
    sides of the 64 KiB TCP eager limit) on 2 hosts x 2 ranks, against a
    sequential reduction. hier runs as itself here, shm as the ring."""
    binary_path = binary("DTRAIN_MPI_COLLECTIVES")
    with Cluster(2) as c:
        p = c.mpirun(["-H", "h1:2,h2:2", "-n", "4", binary_path, "--large-bytes=1048576"],
                     timeout=900)
        print(p.stdout)
        if p.returncode != 0 or "FAILED" in p.stdout:
            fail("the collectives matrix failed on 2 hosts x 2 ranks")
        m = re.search(r"\[  PASSED  \] (\d+) tests", p.stdout)
        print("ok: %s tests passed on 2 hosts x 2 ranks" % (m.group(1) if m else "?"))


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CASES:
        print("usage: cluster_test.py " + "|".join(sorted(CASES)))
        sys.exit(2)
    skip_unless_possible()
    CASES[sys.argv[1]]()
    print("PASS")
