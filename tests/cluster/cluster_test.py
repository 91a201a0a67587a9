#!/usr/bin/python3
"""Tests on the namespace cluster (tests/cluster/cluster.sh): several hosts
on this machine, each with its own network, hostname and /dev/shm.

    cluster_test.py CASE        (see CASES at the bottom; one ctest entry each)

Where no cluster can be made (not root, no network namespaces) every case
prints "SKIPPED: <why>" and exits 0, which ctest reports as skipped.

Environment (set by ctest): DTRAIN_ALLREDUCE_PERF, DTRAIN_MPI_COLLECTIVES,
DTRAIN_HEARTBEAT_PROBE, and for the training cases those of
tests/fault/fault_test.py (DTRAIN_RESNET, DTRAIN_CKPT, DTRAIN_DATA,
DTRAIN_LAUNCH, DTRAIN_FAULT_WORK); MPIRUN (optional).

Times (kill -> first step after the resume, cut -> every rank ended) are
measured and printed, never asserted; a test fails on a hang only through
generous guards.
"""
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, HERE)
from cluster import Cluster, skip_unless_possible  # noqa: E402


def fail(message, output=None):
    if output:
        print(output)
    print("FAIL: " + message, flush=True)
    sys.exit(1)


# Each host of a cluster has its own /tmp and /dev/shm (cluster.py), so a
# program under them is not there for the hosts: mpiexec then waits for
# daemons that never start, until the test's timeout.
PRIVATE_DIRS = ("/tmp", "/dev/shm")


def visible_to_hosts(path):
    real = os.path.realpath(path)
    return not any(real == d or real.startswith(d + "/") for d in PRIVATE_DIRS)


def binary(var):
    path = os.environ.get(var)
    if not path or not os.access(path, os.X_OK):
        fail("%s is not set to an executable (ctest sets it)" % var)
    if not visible_to_hosts(path):
        fail("%s is %s, under %s, which each cluster host has a private copy of: build "
             "outside them (a checkout in /tmp cannot run the cluster tests)"
             % (var, path, " or ".join(PRIVATE_DIRS)))
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


# --- failures: the heartbeat --------------------------------------------------

def probe_cmd(report, *args):
    return [binary("DTRAIN_HEARTBEAT_PROBE"), "--report-dir", report] + [str(a) for a in args]


def read_reports(report, prefix):
    out = {}
    for name in os.listdir(report):
        if name.startswith(prefix) and not name.endswith(".tmp"):
            with open(os.path.join(report, name)) as f:
                out[int(name[len(prefix) + 4:])] = f.read().strip()
    return out


def fresh_dir(name):
    path = os.path.join(os.environ.get("DTRAIN_FAULT_WORK", "/var/tmp/dtrain-cluster-work"), name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def probes_left(c):
    """Hosts on which a heartbeat_probe process is still running."""
    left = []
    for h in c.hosts:
        for pid in c.pids(h):
            try:
                with open("/proc/%d/comm" % pid) as f:
                    if f.read().strip() == "heartbeat_probe":
                        left.append(h)
                        break
            except OSError:
                pass
    return left


RE_BACKSTOP = re.compile(r"^\[dtrain rank (\d+)\] aborting the job: heartbeat: (lost contact .*)$",
                         re.M)


def case_cut_mid_allreduce():
    """3 hosts x 2 ranks all-reducing 4 MiB in a loop; h2's link is cut.
    Every rank, on either side of the cut, ends well before the collectives'
    timeout (300 s): only the heartbeat can end them this early. A rank
    reports either the error of its op, naming the op and the ranks and
    hosts it lost, or, when its op could not return to say so (it was inside
    Open MPI, retrying a connection to the cut host), the heartbeat's own
    abort naming the lost ranks and hosts. A rank that does neither was
    ended by mpirun after another rank had aborted the job. Prints cut ->
    report per rank, and cut -> no rank left on any host."""
    report = fresh_dir("cut-probe")
    with Cluster(3) as c:
        cmd = c.mpirun_cmd(["-H", "h1:2,h2:2,h3:2", "-n", "6"] +
                           probe_cmd(report, "--iters", 1000000, "--bytes", 4 << 20))
        print("$ " + " ".join(cmd), flush=True)
        job = subprocess.Popen(cmd, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                progress = read_reports(report, "progress-")
                if len(progress) == 6 and min(int(v) for v in progress.values()) >= 3:
                    break
                if job.poll() is not None:
                    fail("the probe ended before the cut", job.stdout.read())
                time.sleep(0.1)
            else:
                fail("the probe did not get going")
            c.cut("h2")
            cut_at = time.time()
            print("cut h2 at %.3f" % cut_at, flush=True)
            # A guard against a hang, far below the 300 s collective timeout.
            deadline = time.time() + 90
            while probes_left(c) and time.time() < deadline:
                time.sleep(0.1)
            left = probes_left(c)
            all_ended = time.time() - cut_at
            errors = read_reports(report, "error-")
        finally:
            job.kill()
            output = job.communicate()[0]
        print(output)
    if left:
        fail("ranks still running on %s %.0f s after the cut" % (left, all_ended))
    backstop = {int(r): text for r, text in RE_BACKSTOP.findall(output)}
    print("%-6s %-5s %8s  %s" % ("rank", "host", "cut->err", "report"))
    for r in range(6):
        host = "h%d" % (r // 2 + 1)
        # What a rank's heartbeat knows when its health fails: the ranks
        # that it, and the others whose notices came in by then, found
        # silent (h2's are rank 1's and rank 4's neighbours; h2's ranks
        # lose ranks 1 and 4). Under load a notice can come too late to be
        # named, so one side of the cut may name one rank, or one host.
        want = (r"lost contact with ranks \[(1\] on host h1|4\] on host h3)" if host == "h2"
                else r"lost contact with ranks \[(2|3|2, 3)\] on host h2")
        if r in errors:
            stamp, _, text = errors[r].partition(" ")
            print("%-6d %-5s %7.1fs  %s" % (r, host, float(stamp) - cut_at, text))
            if "all_reduce(" not in text:
                fail("rank %d's error does not name the all-reduce: %s" % (r, text))
        elif r in backstop:
            text = backstop[r]
            print("%-6d %-5s %8s  heartbeat abort: %s" % (r, host, "", text))
        else:
            print("%-6d %-5s %8s  (ended by mpirun after another rank aborted)" % (r, host, ""))
            continue
        if not re.search(want, text):
            fail("rank %d's report does not match %s: %s" % (r, want, text))
    if not any(r in errors for r in (2, 3)) or not any(r in errors for r in (0, 1, 4, 5)):
        fail("no rank on one side of the cut reported the error of its op: %s" % sorted(errors))
    print("cut -> no rank left on any host: %.1f s (polled every 0.1 s)" % all_ended)


def case_slow_rank():
    """A rank that computes for 60 s while its peers wait in an all-reduce is
    slow, not dead: the heartbeat keeps quiet and the job finishes."""
    report = fresh_dir("slow-probe")
    with Cluster(2) as c:
        p = c.mpirun(["-H", "h1:1,h2:1", "-n", "2"] +
                     probe_cmd(report, "--iters", 5, "--bytes", 1 << 20, "--stall-rank", 1,
                               "--stall-at", 2, "--stall-seconds", 60), timeout=300)
        print(p.stdout)
    if p.returncode != 0 or p.stdout.count("done: 5 iterations") != 2:
        fail("the job with a slow rank did not finish on both ranks")
    if read_reports(report, "error-"):
        fail("errors: %s" % read_reports(report, "error-"))


# --- failures under dtrain-launch: the trainer -------------------------------

def fault_tools():
    """tests/fault/fault_test.py: its data set, trainer options and checks."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "fault"))
    import fault_test
    return fault_test


class Supervised:
    """dtrain-launch running a job on the cluster's hosts, its output kept."""

    def __init__(self, c, ranks, hosts, train, extra=(), pass_env=(), env=None):
        ft = fault_tools()
        self.log = os.path.join(os.path.dirname(train[train.index("--out") + 1]),
                                os.path.basename(train[train.index("--out") + 1]) + ".jsonl")
        if os.path.exists(self.log):
            os.remove(self.log)
        cmd = [ft.LAUNCH, "-n", str(ranks), "--backoff", "0.1", "--max-restarts", "3",
               "--log", self.log] + (["--hosts", hosts] if hosts else [])
        # mpirun's flags as separate words: --launcher-arg --mca ...
        for arg in c.mpirun_args():
            cmd += ["--launcher-arg", arg]
        for name in pass_env:
            cmd += ["--launcher-arg", "-x", "--launcher-arg", name]
        cmd += list(extra) + ["--"] + train
        print("$ " + " ".join(cmd), flush=True)
        self.proc = subprocess.Popen(cmd, env=dict(c.env, **(env or {})),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for(self, predicate, what, timeout=180):
        deadline = time.time() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                fail("dtrain-launch ended (%d) before %s" % (self.proc.returncode, what))
            if time.time() > deadline:
                self.proc.kill()
                fail("timed out waiting for " + what)
            time.sleep(0.05)

    def finish(self, timeout=600):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            fail("dtrain-launch did not finish within %d s" % timeout)
        self.reader.join(timeout=10)
        return self.proc.returncode

    def events(self, kind):
        with open(self.log) as f:
            return [e for e in map(json.loads, f) if e["event"] == kind]


def train_records(out, rank=0):
    path = os.path.join(out, "metrics", "metrics-rank%05d.jsonl" % rank)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_step(out):
    steps = [r["step"] for r in train_records(out) if r["kind"] == "train"]
    return max(steps) if steps else 0


def first_step_after_resume(out):
    """The first train record of the last run (after its 'run' record)."""
    records = train_records(out)
    runs = [i for i, r in enumerate(records) if r["kind"] == "run"]
    after = [r for r in records[runs[-1]:] if r["kind"] == "train"]
    return records[runs[-1]], (after[0] if after else None)


def case_kill_host():
    """3 hosts x 2 ranks, one epoch; every process of h2 is killed in the
    middle of a step. dtrain-launch attributes the failure to h2 (Open MPI:
    "lost communication with a remote daemon ... on node h2"), restarts on
    h1 and h3 with 4 ranks and the same global batch, the trainer resumes
    from its newest checkpoint, and every sample of the epoch is used exactly
    once. Prints kill -> first step after the resume."""
    ft = fault_tools()
    out = fresh_dir("kill-host")
    steps = ft.SAMPLES // 48
    train = ft.trainer_args(out, steps, ["--sample-log", os.path.join(out, "samples")],
                            global_batch=48, eval_batch=96, comm_timeout=300)
    with Cluster(3) as c:
        job = Supervised(c, 6, "h1:2,h2:2,h3:2", train,
                         ["--min-ranks", "4", "--batch-divisor", "48", "--shrink-after", "1"])
        job.wait_for(lambda: last_step(out) >= 6, "step 6")
        c.kill("h2")
        killed_at = time.time()
        rc = job.finish()
    if rc != 0:
        fail("the job did not finish after h2 was killed (exit %d)" % rc)
    failure = job.events("failure")
    if len(failure) != 1 or failure[0].get("host") != "h2":
        fail("failures %s: expected one, attributed to h2" % failure)
    shrink = job.events("shrink")
    if not shrink or shrink[0].get("excluded") != ["h2"] or shrink[0].get("ranks") != 4:
        fail("expected h2 left out and 4 ranks: %s" % shrink)
    if "--host h1:2,h3:2" not in " ".join(job.events("start")[-1]["command"]):
        fail("the restart did not run on h1 and h3")
    ft.audit_epoch(out, steps, 48, final_world=4)
    run, first = first_step_after_resume(out)
    if run.get("resumed_from_step") is None or first is None:
        fail("the restart did not resume from a checkpoint")
    print("kill h2 -> first step after the resume (step %d, resumed from step %d on %d ranks): "
          "%.1f s" % (first["step"], run["resumed_from_step"], run["world_size"],
                      first["time"] - killed_at))


def lost_h2(c, out, how, reference):
    """2 ranks on h1 and h2 (of h1, h2, h3); h2 killed or cut after step 6:
    the job goes on with 2 ranks on h1 and h3 and ends bitwise equal to the
    run that never failed."""
    ft = fault_tools()
    train = ft.trainer_args(out, 12, comm_timeout=300)
    job = Supervised(c, 2, "h1:1,h2:1,h3:1", train, ["--shrink-after", "1"])
    job.wait_for(lambda: last_step(out) >= 6, "step 6")
    if how == "kill":
        c.kill("h2")
    else:
        c.cut("h2")
    lost_at = time.time()
    rc = job.finish()
    if rc != 0:
        fail("%s h2: the job did not finish (exit %d)" % (how, rc))
    failure = job.events("failure")
    if len(failure) != 1 or failure[0].get("host") != "h2":
        fail("%s h2: failures %s, expected one attributed to h2" % (how, failure))
    starts = job.events("start")
    if starts[-1]["hosts"] != ["h1", "h3"] or starts[-1]["ranks"] != 2:
        fail("%s h2: the restart ran %d ranks on %s, expected 2 on h1,h3"
             % (how, starts[-1]["ranks"], starts[-1]["hosts"]))
    if how == "cut":
        ends = job.events("end")
        if len(ends) != 1:
            fail("cut h2: the supervisor did not end the hanging launcher: %s" % ends)
        if "lost contact with ranks [1] on host h2" not in job.output:
            fail("cut h2: no rank reported losing rank 1 on h2")
        ended_at = datetime.datetime.fromisoformat(ends[0]["time"]).timestamp()
        print("cut h2 -> the supervisor ended the launcher: %.1f s" % (ended_at - lost_at))
    ft.same_checkpoints(reference + "/checkpoints", out + "/checkpoints")
    run, first = first_step_after_resume(out)
    print("%s h2 -> first step after the resume (step %d, resumed from step %s): %.1f s"
          % (how, first["step"], run["resumed_from_step"], first["time"] - lost_at))


def case_lost_host_bitwise():
    """h2 killed, then (another run) h2 cut off, each after step 6 of 12:
    both runs go on with 2 ranks on h1 and h3 and end bitwise equal to a run
    on h1 and h2 that never failed (same world size and global batch). The
    cut is noticed by the heartbeat, not the 300 s collective timeout, and
    the supervisor ends the mpirun that keeps waiting for h2."""
    ft = fault_tools()
    reference = fresh_dir("lost-h2-reference")
    with Cluster(3) as c:
        job = Supervised(c, 2, "h1:1,h2:1", ft.trainer_args(reference, 12, comm_timeout=300))
        if job.finish() != 0:
            fail("the reference run failed")
    for how in ("kill", "cut"):
        with Cluster(3) as c:
            lost_h2(c, fresh_dir("lost-h2-" + how), how, reference)


def case_kill_during_save():
    """h2 is killed while rank 1 (on h2) is in the middle of the
    asynchronous save of step 8 (its file written, nothing committed): the
    restart on h1 and h3 resumes from step 4, and step 8 never appears
    half-written."""
    ft = fault_tools()
    out = fresh_dir("kill-during-save")
    train = ft.trainer_args(out, 12, comm_timeout=300)
    with Cluster(3) as c:
        job = Supervised(c, 2, "h1:1,h2:1,h3:1", train, ["--shrink-after", "1"],
                         pass_env=["DTRAIN_FAULT_CHECKPOINT"],
                         env={"DTRAIN_FAULT_CHECKPOINT": "after_write:8:1:stall"})
        job.wait_for(lambda: "stalled while saving step 8" in job.output, "the stalled save")
        c.kill("h2")
        rc = job.finish()
    if rc != 0:
        fail("the job did not finish (exit %d)" % rc)
    if job.events("failure")[0].get("host") != "h2":
        fail("the failure was not attributed to h2")
    if "(step 4," not in job.output or "resumed from" not in job.output:
        fail("the restart did not resume from the step-4 checkpoint")
    if any(n.startswith(".tmp-") for n in os.listdir(out + "/checkpoints")):
        fail("a temporary checkpoint directory was left behind")
    if ft.steps_of(out + "/checkpoints") != [4, 8, 12]:
        fail("checkpoints: %s" % ft.steps_of(out + "/checkpoints"))
    if ft.run([ft.CKPT, "verify", out + "/checkpoints"]).returncode != 0:
        fail("the checkpoints do not verify")


def case_launch_errors():
    """A hostfile naming a host that does not answer (its link is cut): the
    first attempt fails before any training and names it; the next runs on
    the others. More ranks than slots: a usage error before anything runs."""
    ft = fault_tools()
    out = fresh_dir("dead-host")
    hostfile = os.path.join(out, "hostfile")
    with open(hostfile, "w") as f:
        f.write("h1 slots=1\nh2 slots=1\nh3 slots=1\n")
    with Cluster(3) as c:
        c.cut("h2")
        job = Supervised(c, 2, None, ft.trainer_args(out, 4),
                         ["--hostfile", hostfile, "--shrink-after", "1"])
        rc = job.finish()
        if rc != 0:
            fail("the job did not finish on the hosts that answer (exit %d)" % rc)
        failure = job.events("failure")
        if len(failure) != 1 or failure[0].get("host") != "h2" or "h2" not in failure[0].get(
                "hosts", []):
            fail("the unreachable host was not named: %s" % failure)
        if not re.search(r"attempt 0 failed .*host h2 lost or unreachable \(ssh: connect to host "
                         r"h2", job.output):
            fail("the log does not say that h2 did not answer")
        first_runs = [r for r in train_records(out) if r["kind"] == "run"]
        if len(first_runs) != 1:
            fail("training started %d times; the attempt with h2 must not train" % len(first_runs))
        p = subprocess.run([ft.LAUNCH, "-n", "4", "--hosts", "h1:1,h3:1", "--"] +
                           ft.trainer_args(out, 4), env=c.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        print(p.stdout)
        if p.returncode != 2 or "4 ranks do not fit the 2 slots of --hosts (h1:1,h3:1)" not in \
                p.stdout:
            fail("more ranks than slots: exit %d" % p.returncode)


# --- Slurm on the hosts ---------------------------------------------------------

SLURM_LOCAL = os.path.join(os.path.dirname(os.path.dirname(HERE)), "scripts", "launch",
                           "slurm-local.sh")
SBATCH_SCRIPT = os.path.join(os.path.dirname(SLURM_LOCAL), "dtrain.sbatch")


def slurm_env(c):
    """slurm-local.sh on the cluster: slurmd on each host, slurmctld here."""
    nodes = " ".join("%s=%s" % (h, c.address(h)) for h in c.hosts)
    env = dict(c.env, DTRAIN_SLURM_DIR=os.path.join(c.dir, "slurm"), DTRAIN_SLURM_PORT="7017",
               DTRAIN_SLURM_NODES=nodes, DTRAIN_SLURM_CONTROL_ADDR=c.subnet + ".254",
               DTRAIN_SLURM_NODE_EXEC=os.path.join(HERE, "cluster.sh") + " exec",
               DTRAIN_SLURM_CPUS="2")
    env["SLURM_CONF"] = os.path.join(env["DTRAIN_SLURM_DIR"], "slurm.conf")
    return env


def slurm_job_state(env, job):
    p = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    state = re.search(r"JobState=(\S+)", p.stdout)
    code = re.search(r" ExitCode=(\d+):(\d+)", p.stdout)
    return (state.group(1) if state else "?"), (int(code.group(1)) if code else None)


def case_slurm_nodes():
    """A 3-node Slurm on the hosts (a slurmd on each, slurmctld here).
    `sbatch -N 3 -n 6 scripts/launch/dtrain.sbatch` trains on 3 hosts x 2
    ranks; h2 (slurmd, slurmstepd and ranks) is killed mid-job. Inside the
    allocation dtrain-launch restarts the step without h2 (srun
    --exclude=h2) on 4 ranks, the job finishes, and every sample of the
    epoch is used exactly once."""
    ft = fault_tools()
    for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
        if shutil.which(tool) is None and not os.path.exists("/usr/sbin/" + tool):
            fail("%s is not installed: run scripts/setup.sh" % tool)
    out = fresh_dir("slurm-nodes")
    steps = ft.SAMPLES // 48
    train = ft.trainer_args(out, steps, ["--sample-log", os.path.join(out, "samples")],
                            global_batch=48, eval_batch=96, comm_timeout=300)
    log = os.path.join(out, "launch.jsonl")
    with Cluster(3) as c:
        env = slurm_env(c)
        p = subprocess.run([SLURM_LOCAL, "start"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=120)
        print(p.stdout)
        if p.returncode != 0:
            fail("the 3-node Slurm did not start")
        try:
            job_env = dict(env, DTRAIN_MIN_RANKS="4", DTRAIN_BATCH_DIVISOR="48",
                           DTRAIN_SHRINK_AFTER="1", DTRAIN_BACKOFF="0.1",
                           DTRAIN_LAUNCH_LOG=log)
            p = subprocess.run(["sbatch", "--parsable", "-N", "3", "-n", "6", "-o",
                                os.path.join(out, "job.out"), SBATCH_SCRIPT] + train,
                               env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, timeout=60)
            print(p.stdout)
            job = p.stdout.strip().split(";")[0]
            if p.returncode != 0 or not job.isdigit():
                fail("sbatch failed")
            deadline = time.time() + 240
            while last_step(out) < 6:
                if time.time() > deadline or slurm_job_state(env, job)[0] not in (
                        "PENDING", "RUNNING", "CONFIGURING"):
                    fail("the job did not reach step 6: %s" % (slurm_job_state(env, job),))
                time.sleep(0.1)
            c.kill("h2")
            killed_at = time.time()
            deadline = time.time() + 300
            while slurm_job_state(env, job)[0] in ("PENDING", "RUNNING", "CONFIGURING",
                                                    "COMPLETING"):
                if time.time() > deadline:
                    fail("the job did not end within 300 s of the kill")
                time.sleep(0.5)
            state, code = slurm_job_state(env, job)
        finally:
            with open(os.path.join(out, "job.out")) as f:
                print(f.read())
            subprocess.run(["scancel", job] if "job" in dir() else ["true"], env=env)
            subprocess.run([SLURM_LOCAL, "stop"], env=env, timeout=120)
    if state != "COMPLETED" or code != 0:
        fail("the batch job ended %s with exit code %s" % (state, code))
    with open(log) as f:
        events = [json.loads(line) for line in f]
    failures = [e for e in events if e["event"] == "failure"]
    starts = [e for e in events if e["event"] == "start"]
    if not failures or failures[0].get("host") != "h2":
        fail("the failure was not attributed to h2: %s" % failures)
    if "--exclude=h2" not in starts[-1]["command"] or starts[-1]["ranks"] != 4:
        fail("the last step did not run 4 ranks without h2: %s" % starts[-1]["command"])
    ft.audit_epoch(out, steps, 48, final_world=4)
    run, first = first_step_after_resume(out)
    print("kill h2 -> first step after the resume under Slurm (step %d, resumed from step %s "
          "on %d ranks): %.1f s" % (first["step"], run["resumed_from_step"], run["world_size"],
                                   first["time"] - killed_at))


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CASES:
        print("usage: cluster_test.py " + "|".join(sorted(CASES)))
        sys.exit(2)
    skip_unless_possible()
    CASES[sys.argv[1]]()
    print("PASS")
