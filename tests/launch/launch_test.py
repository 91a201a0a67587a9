#!/usr/bin/python3
"""Tests of scripts/launch/dtrain-launch with a fake job (tests/launch/fake_job.py).

Usage: launch_test.py CASE          (one ctest entry per case)
       launch_test.py --list

Cases named fake_* use tests/launch/fake_mpirun.py in place of mpirun and
need no MPI; real_* go through dtrain-mpirun and the real mpirun ($MPIRUN, or
mpirun on PATH). Assertions are on exit codes, files written by the fake job
and the supervisor's log, never on elapsed times; timeouts only break hangs.
"""

import importlib.machinery
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.realpath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LAUNCH = os.environ.get("DTRAIN_LAUNCH", os.path.join(ROOT, "scripts", "launch", "dtrain-launch"))
FAKE_JOB = os.path.join(HERE, "fake_job.py")
FAKE_MPIRUN = os.path.join(HERE, "fake_mpirun.py")
HANG = 120  # seconds; only to turn a hang into a failure


class Failure(Exception):
    pass


def check(cond, message, output=None):
    if not cond:
        if output is not None:
            sys.stderr.write("---- supervisor output ----\n%s\n---------------------------\n"
                             % output)
        raise Failure(message)


class Case:
    def __init__(self, tmp, real):
        self.tmp = tmp
        self.state = os.path.join(tmp, "state")
        self.env = dict(os.environ)
        for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_JOB_NODELIST",
                  "SLURM_TASKS_PER_NODE", "DTRAIN_MPIRUN", "DTRAIN_SRUN"):
            self.env.pop(k, None)
        if not real:
            self.env["MPIRUN"] = FAKE_MPIRUN  # used by dtrain-mpirun
        self.log = os.path.join(tmp, "launch.jsonl")

    def job(self, *args):
        return [FAKE_JOB, "--state", self.state] + [str(a) for a in args]

    def launch_cmd(self, opts, job):
        return [LAUNCH, "--log", self.log] + [str(o) for o in opts] + ["--"] + job

    def run(self, opts, job, expect=None):
        p = subprocess.run(self.launch_cmd(opts, job), env=self.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=HANG)
        sys.stdout.write(p.stdout)
        if expect is not None:
            check(p.returncode == expect, "dtrain-launch exited %d, expected %d"
                  % (p.returncode, expect), p.stdout)
        return p.returncode, p.stdout

    def runs(self):
        """Lines of the fake job's runs.log as dicts."""
        path = os.path.join(self.state, "runs.log")
        if not os.path.exists(path):
            return []
        out = []
        with open(path) as f:
            for line in f:
                out.append(dict(kv.split("=", 1) for kv in line.split()))
        return out

    def starts(self, rank):
        try:
            with open(os.path.join(self.state, "starts.rank%d" % rank)) as f:
                return int(f.read())
        except FileNotFoundError:
            return 0

    def events(self, kind=None):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            ev = [json.loads(l) for l in f if l.strip()]
        return [e for e in ev if kind is None or e["event"] == kind]

    def attempts_by_size(self):
        """{attempt: world size} from runs.log (attempts counted by DTRAIN_RESTART_COUNT)."""
        sizes = {}
        for r in self.runs():
            sizes.setdefault(int(r["restart_count"]), set()).add(int(r["size"]))
        return sizes


QUICK = ["--backoff", "0.05", "--backoff-max", "0.2"]


# ------------------------------------------------------------------ cases --
def case_usage(c, real):
    bad = [
        [],                                     # no program
        ["-n", "2"],                            # no program
        ["--bogus", "--", "true"],              # unknown option
        ["-n", "0", "--", "true"],
        ["-n", "x", "--", "true"],
        ["-n", "2", "--min-ranks", "3", "--", "true"],
        ["-n", "4", "--batch-divisor", "6", "--", "true"],
        ["--launcher", "pbs", "--", "true"],
        ["--max-restarts", "-1", "--", "true"],
        ["--backoff", "-1", "--", "true"],
        ["--launcher", "srun", "--hosts", "a:2", "--", "true"],
        ["--hosts", "a:x", "--", "true"],
    ]
    for opts in bad:
        p = subprocess.run([LAUNCH] + opts, env=c.env, capture_output=True, text=True,
                           timeout=HANG)
        check(p.returncode == 2, "%s: exit %d, expected 2" % (opts, p.returncode),
              p.stdout + p.stderr)
        check("error:" in p.stderr and "usage:" in p.stderr,
              "%s: no clear usage message" % opts, p.stderr)
        check(not os.path.exists(c.state), "%s: the job was started" % opts)
    p = subprocess.run([LAUNCH, "--help"], capture_output=True, text=True, timeout=HANG)
    check(p.returncode == 0 and "--max-restarts" in p.stdout and "75" in p.stdout,
          "--help", p.stdout + p.stderr)
    # --dry-run prints the command, options may also come without `--`.
    p = subprocess.run([LAUNCH, "--dry-run", "-n", "3", "--launcher", "mpirun", "prog", "-x",
                        "--ranks", "9"], env=c.env, capture_output=True, text=True,
                       timeout=HANG)
    check(p.returncode == 0, "--dry-run exit %d" % p.returncode, p.stdout + p.stderr)
    check(re.search(r"DTRAIN_LAUNCH_RANKS=3 \S*dtrain-mpirun -n 3 prog -x --ranks 9$",
                    p.stdout.strip()), "--dry-run output", p.stdout)
    env = dict(c.env, SLURM_JOB_ID="1", SLURM_NTASKS="4", DTRAIN_SRUN="/bin/true")
    p = subprocess.run([LAUNCH, "--dry-run", "--", "prog"], env=env, capture_output=True,
                       text=True, timeout=HANG)
    check(re.search(r"^DTRAIN_RESTART_COUNT=0 DTRAIN_LAUNCH_RANKS=4 /bin/true --mpi=pmix -n 4 "
                    r"--kill-on-bad-exit=1 .*prog$", p.stdout.strip()),
          "--dry-run in Slurm: auto launcher should be srun with SLURM_NTASKS ranks", p.stdout)


def case_success(c, real):
    c.run(["-n", 2] + QUICK, c.job(), expect=0)
    runs = c.runs()
    check(len(runs) == 2, "expected 2 rank starts, got %d" % len(runs))
    check(all(r["restart_count"] == "0" and r["launch_ranks"] == "2" and r["size"] == "2"
              for r in runs), "DTRAIN_RESTART_COUNT/DTRAIN_LAUNCH_RANKS not as expected: %s"
          % runs)
    check([e["event"] for e in c.events()] == ["start", "finished"], "events %s" % c.events())


def case_restart_kill(c, real):
    rc, out = c.run(["-n", 2] + QUICK, c.job("--fail-rank", 1, "--fail-attempts", 1),
                    expect=0)
    check(c.starts(0) == 2 and c.starts(1) == 2, "expected 2 attempts", out)
    check(sorted(r["restart_count"] for r in c.runs()) == ["0", "0", "1", "1"],
          "DTRAIN_RESTART_COUNT should be 0 then 1: %s" % c.runs())
    fail = c.events("failure")
    check(len(fail) == 1, "expected one failure event", out)
    check(fail[0].get("rank") == 1 and fail[0].get("signal") == 9 and fail[0]["attempt"] == 0,
          "failure event should name rank 1 and signal 9: %s" % fail[0], out)
    check(fail[0].get("host"), "failure event should name the host: %s" % fail[0], out)
    check(re.search(r"^\[dtrain-launch\] \d{4}-\d\d-\d\dT\S+ attempt 0 failed .*rank 1 on \S+ "
                    r"killed by signal 9", out, re.M), "failure line on stderr", out)
    check(re.search(r"^\[dtrain-launch\] \S+ restart 1 of 3 in 0.05s with 2 ranks", out, re.M),
          "restart line on stderr", out)
    check(len(c.events("finished")) == 1, "no finished event", out)


def case_max_restarts(c, real):
    rc, out = c.run(["-n", 2, "--max-restarts", 2] + QUICK,
                    c.job("--fail-rank", 1, "--fail-attempts", 100, "--fail-mode", "exit:3"),
                    expect=3)
    check(c.starts(1) == 3, "expected 3 attempts (1 + 2 restarts), got %d" % c.starts(1), out)
    check(len(c.events("restart")) == 2, "expected 2 restarts", out)
    check(len(c.events("give-up")) == 1 and "no restarts left" in out, "give-up message", out)
    check(all(e.get("exit_code") == 3 and e.get("rank") == 1 for e in c.events("failure")),
          "failures should record exit code 3 of rank 1: %s" % c.events("failure"), out)


def case_exit2(c, real):
    # Every rank rejects its input.
    rc, out = c.run(["-n", 2] + QUICK, c.job("--exit", 2), expect=2)
    check(c.starts(0) == 1 and c.starts(1) == 1, "exit 2 must not be restarted", out)
    check("not restarting" in out and not c.events("restart"), "log says why", out)


def case_exit2_one_rank(c, real):
    # One rank exits 2, the others are stopped by the launcher (srun then
    # reports 143): the first failure decides.
    srun = os.path.join(c.tmp, "srun")
    os.symlink(FAKE_MPIRUN, srun)
    c.env.update(DTRAIN_SRUN=srun)
    rc, out = c.run(["-n", 2, "--launcher", "srun"] + QUICK,
                    c.job("--fail-rank", 1, "--fail-attempts", 5, "--fail-mode", "exit:2",
                          "--run", 5), expect=2)
    check(c.starts(1) == 1, "exit 2 must not be restarted", out)
    check("srun: error:" in out and "(launcher exit code 143)" in out,
          "fake srun should have reported the task and exited 143", out)


def case_stopped_75_restarts(c, real):
    # Exit 75 while the supervisor is not stopping (e.g. a preemption signal
    # sent to the ranks only) is restarted.
    rc, out = c.run(["-n", 2] + QUICK,
                    c.job("--fail-rank", 0, "--fail-attempts", 1, "--fail-mode", "exit:75"),
                    expect=0)
    check(c.starts(0) == 2, "exit 75 without a stop request should be restarted", out)


def case_backoff(c, real):
    rc, out = c.run(["-n", 1, "--max-restarts", 4, "--backoff", "0.05", "--backoff-max", "0.3"],
                    c.job("--fail-rank", 0, "--fail-attempts", 100, "--fail-mode", "exit:5"),
                    expect=5)
    delays = [e["delay"] for e in c.events("restart")]
    check(delays == [0.05, 0.1, 0.2, 0.3], "delays %s, expected [0.05, 0.1, 0.2, 0.3]"
          % delays, out)
    logged = re.findall(r"^\[dtrain-launch\] \S+ restart \d of 4 in ([\d.]+)s", out, re.M)
    check(logged == ["0.05", "0.1", "0.2", "0.3"], "stderr delays %s" % logged, out)
    check(c.starts(0) == 5, "expected 5 attempts", out)


def case_shrink(c, real):
    # Rank 3 keeps failing on the only host: after 2 failures (--shrink-after)
    # the job goes from 4 to 2 ranks (3 does not divide the batch of 4).
    rc, out = c.run(["-n", 4, "--min-ranks", 2, "--batch-divisor", 4, "--shrink-after", 2]
                    + QUICK, c.job("--fail-rank", 3, "--fail-attempts", 100), expect=0)
    sizes = c.attempts_by_size()
    check(sizes == {0: {4}, 1: {4}, 2: {2}}, "world sizes per attempt %s, expected 4, 4, 2"
          % sizes, out)
    check(all(r["launch_ranks"] == r["size"] for r in c.runs()),
          "DTRAIN_LAUNCH_RANKS should follow the shrink: %s" % c.runs())
    shrink = c.events("shrink")
    check(len(shrink) == 1 and shrink[0]["ranks_before"] == 4 and shrink[0]["ranks"] == 2,
          "shrink event %s" % shrink, out)
    check(re.search(r"\S+ failed 2 times \(--shrink-after 2, single host\): next attempt with "
                    r"4 -> 2 ranks", out), "log should say why it shrinks", out)
    check(re.search(r"restart 2 of 3 in \S+ with 2 ranks", out), "restart line with 2 ranks",
          out)


def case_shrink_no_divisor(c, real):
    # Without --batch-divisor it goes 3 -> 2 -> ... one rank at a time, never below 2.
    rc, out = c.run(["-n", 3, "--min-ranks", 2, "--shrink-after", 1, "--max-restarts", 3]
                    + QUICK, c.job("--fail-rank", 1, "--fail-attempts", 100), expect=137)
    sizes = c.attempts_by_size()
    check(sizes == {0: {3}, 1: {2}, 2: {2}, 3: {2}}, "world sizes per attempt %s" % sizes, out)
    check(len(c.events("shrink")) == 1, "one shrink expected: %s" % c.events("shrink"), out)


def case_exclude_host(c, real):
    # Two hosts of 2 slots; rank 2 (on host b) keeps failing: b is left out.
    rc, out = c.run(["-n", 4, "--hosts", "a:2,b:2", "--min-ranks", 2, "--batch-divisor", 8]
                    + QUICK, c.job("--fail-rank", 2, "--fail-attempts", 100), expect=0)
    by_attempt = {}
    for r in c.runs():
        by_attempt.setdefault(int(r["restart_count"]), []).append(r["host"])
    check({k: sorted(v) for k, v in by_attempt.items()} ==
          {0: ["a", "a", "b", "b"], 1: ["a", "a", "b", "b"], 2: ["a", "a"]},
          "hosts per attempt %s" % by_attempt, out)
    check(re.search(r"host b failed 2 times \(--shrink-after 2\): next attempt without it, "
                    r"4 -> 2 ranks on a", out), "log should say b is left out", out)
    starts = [e for e in c.events("start")]
    check("--host a:2,b:2" in " ".join(starts[0]["command"]) and
          "--host a:2" == " ".join(starts[2]["command"][3:5]),
          "mpirun --host lists %s" % [e["command"] for e in starts], out)


def case_exclude_host_srun(c, real):
    srun = os.path.join(c.tmp, "srun")
    os.symlink(FAKE_MPIRUN, srun)
    c.env.update(DTRAIN_SRUN=srun, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="na,nb",
                 SLURM_TASKS_PER_NODE="2(x2)", SLURM_NTASKS="4")
    rc, out = c.run(["--min-ranks", 2] + QUICK,
                    c.job("--fail-rank", 3, "--fail-attempts", 100), expect=0)
    starts = c.events("start")
    check(len(starts) == 3, "expected 3 attempts", out)
    check(starts[0]["ranks"] == 4 and "--exclude=nb" in starts[2]["command"] and
          starts[2]["ranks"] == 2, "third attempt should exclude nb with 2 ranks: %s"
          % [e["command"] for e in starts], out)
    check(all(e.get("host") == "nb" and e.get("rank") == 3 for e in c.events("failure")),
          "failures should be attributed to rank 3 on nb", out)


def case_exclude_keep_ranks(c, real):
    # 2 ranks on hosts a, b, c of 1 slot: whatever runs on b fails; b is left
    # out after its first failure and the job goes on with 2 ranks on a and c
    # (--min-ranks is 2: no shrinking, only a host swap).
    rc, out = c.run(["-n", 2, "--hosts", "a:1,b:1,c:1", "--shrink-after", 1] + QUICK,
                    c.job("--fail-host", "b", "--fail-attempts", 100), expect=0)
    by_attempt = {}
    for r in c.runs():
        by_attempt.setdefault(int(r["restart_count"]), []).append(r["host"])
    check({k: sorted(v) for k, v in by_attempt.items()} == {0: ["a", "b"], 1: ["a", "c"]},
          "hosts per attempt %s" % by_attempt, out)
    check(re.search(r"host b failed once \(--shrink-after 1\): next attempt without it, "
                    r"keeping 2 ranks on a,c", out), "log should say b is left out", out)
    starts = c.events("start")
    check(starts[1]["command"][3:5] == ["--host", "a:1,c:1"] and
          starts[1]["command"][5:9] == ["-x", "DTRAIN_RESTART_COUNT", "-x",
                                        "DTRAIN_LAUNCH_RANKS"],
          "second attempt's mpirun command %s" % starts[1]["command"], out)


# Failure reports of real launchers and of dtrain, each naming a lost host
# (b) that is not the host of the rank whose failure comes first (rank 0 on
# a, here the one printing the report). Open MPI 4.1 and the ssh line are
# copied from runs on the namespace cluster (tests/cluster); Open MPI 5 is
# PRRTE's help text "node-died" filled in the same way; the dtrain lines
# are what Runtime::abort_job prints after the heartbeat or a timeout.
LOST_HOST_REPORTS = {
    "openmpi4_lost_daemon": """\
--------------------------------------------------------------------------
ORTE has lost communication with a remote daemon.

  HNP daemon   : [[16337,0],0] on node vm
  Remote daemon: [[16337,0],2] on node b

This is usually due to either a failure of the TCP network
connection to the node, or possibly an internal failure of
the daemon itself. We cannot recover from this failure, and
therefore will terminate the job.
--------------------------------------------------------------------------
""",
    "openmpi5_lost_daemon": """\
--------------------------------------------------------------------------
PRTE has lost communication with a remote daemon.

  HNP daemon   : [prterun-vm-2211@0,0] on node vm
  Remote daemon: [prterun-vm-2211@0,2] on node b

This is usually due to either a failure of the TCP network
connection to the node, or possibly an internal failure of
the daemon itself. We cannot recover from this failure, and
therefore will terminate the job.
--------------------------------------------------------------------------
""",
    "ssh_unreachable": "ssh: connect to host b port 22: No route to host\n",
    "dtrain_heartbeat": (
        "[dtrain rank 0] aborting the job: all_reduce(ring, sum, 1024 x float32) #57 on "
        "communicator 'world' (rank 0 of 3) was ended: lost contact with ranks [1] on host b "
        "(no heartbeat for more than 4.0 s; noticed by ranks [0, 2])\n"),
    "dtrain_timeout": (
        "[dtrain rank 0] aborting the job: all_reduce(ring, sum, 1024 x float32) #57 on "
        "communicator 'world' (rank 0 of 3) did not finish within 30000 ms; ranks not heard "
        "from: [1]; ranks also waiting in this op: [2]\n"),
}


def case_lost_host_reports(c, real):
    # Each report makes the supervisor attribute the failure to b (not to a,
    # the host of the rank that failed first) and leave b out.
    report = os.path.join(c.tmp, "report.txt")
    for name, text in LOST_HOST_REPORTS.items():
        with open(report, "w") as f:
            f.write(text)
        os.remove(c.log) if os.path.exists(c.log) else None
        for f in os.listdir(c.state) if os.path.exists(c.state) else []:
            os.remove(os.path.join(c.state, f))
        rc, out = c.run(["-n", 2, "--hosts", "a:1,b:1,c:1", "--shrink-after", 1,
                         "--max-restarts", 1] + QUICK,
                        c.job("--fail-rank", 0, "--fail-attempts", 1, "--fail-mode", "exit:1",
                              "--report", report), expect=0)
        failures = c.events("failure")
        check(len(failures) == 1 and failures[0].get("host") == "b",
              "%s: failure attributed to %s, expected b" % (
                  name, [f.get("host") for f in failures]), out)
        starts = c.events("start")
        check(starts[-1]["hosts"] == ["a", "c"], "%s: next attempt on %s, expected a,c"
              % (name, starts[-1]["hosts"]), out)


def case_abort_ends_launcher(c, real):
    # A rank aborts the job but the launcher does not end (mpirun waiting for a
    # cut-off host): after --abort-grace the supervisor ends it and restarts.
    report = os.path.join(c.tmp, "report.txt")
    with open(report, "w") as f:
        f.write(LOST_HOST_REPORTS["dtrain_heartbeat"])
    rc, out = c.run(["-n", 2, "--hosts", "a:1,b:1,c:1", "--shrink-after", 1, "--abort-grace", 1]
                    + QUICK, c.job("--fail-rank", 0, "--fail-attempts", 1, "--fail-mode", "hang",
                                   "--report", report, "--run", 5), expect=0)
    ends = c.events("end")
    check(len(ends) == 1, "the supervisor should end the launcher once: %s" % ends, out)
    check(c.events("failure")[0].get("host") == "b", "failure attributed to b", out)
    check(c.events("start")[-1]["hosts"] == ["a", "c"], "restart without b", out)


def case_launcher_args(c, real):
    # mpirun flags as separate words after --launcher-arg, and a clear error
    # for more ranks than slots.
    rc, out = c.run(["-n", 2, "--launcher-arg", "--mca", "--launcher-arg", "btl",
                     "--launcher-arg", "self,tcp", "--dry-run"], c.job(), expect=0)
    check("--mca btl self,tcp " + FAKE_JOB in out, "launcher args in the command", out)
    rc, out = c.run(["-n", 5, "--hosts", "a:2,b:2"], c.job(), expect=2)
    check("5 ranks do not fit the 4 slots of --hosts (a:2,b:2)" in out, "slots error", out)
    hostfile = os.path.join(c.tmp, "hosts")
    with open(hostfile, "w") as f:
        f.write("a slots=1\nb slots=1\n")
    rc, out = c.run(["-n", 3, "--hostfile", hostfile], c.job(), expect=2)
    check("3 ranks do not fit the 2 slots of %s" % hostfile in out, "hostfile slots error", out)
    check(c.starts(0) == 0, "nothing may start after a usage error", out)


def wait_files(paths, proc, what):
    deadline = time.monotonic() + HANG
    while not all(os.path.exists(p) for p in paths):
        if proc.poll() is not None:
            raise Failure("dtrain-launch exited (%d) before %s" % (proc.returncode, what))
        if time.monotonic() > deadline:
            raise Failure("timed out waiting for " + what)
        time.sleep(0.05)


def stop_case(c, real, sig):
    n = 2
    proc = subprocess.Popen(c.launch_cmd(["-n", n, "--stop-timeout", 60] + QUICK,
                                         c.job("--wait-stop", "--run", 100)),
                            env=c.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_files([os.path.join(c.state, "running.rank%d" % r) for r in range(n)], proc,
                   "the ranks to start")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
    sys.stdout.write(out)
    check(proc.returncode == 75, "dtrain-launch exited %d, expected 75" % proc.returncode, out)
    for r in range(n):
        check(os.path.exists(os.path.join(c.state, "sigterm.rank%d" % r)),
              "rank %d did not get SIGTERM (no marker)" % r, out)
    check(c.starts(0) == 1, "must not restart after a stop request", out)
    check(not c.events("restart") and len(c.events("stopped")) == 1, "events", out)


def case_sigterm(c, real):
    stop_case(c, real, signal.SIGTERM)


def case_sigint(c, real):
    stop_case(c, real, signal.SIGINT)


def case_live_output(c, real):
    # Rank 0 prints READY and waits until the test has seen it; a supervisor
    # that held the output back until the job ends would never let it finish.
    proc = subprocess.Popen(c.launch_cmd(["-n", 2, "--max-restarts", 0],
                                         c.job("--handshake", "--run", 0.1)),
                            env=c.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, bufsize=1)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "READY":
                check(proc.poll() is None, "READY arrived only after the job ended",
                      "".join(lines))
                os.makedirs(c.state, exist_ok=True)
                open(os.path.join(c.state, "go"), "w").close()
        proc.wait(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    sys.stdout.write(out)
    check(any(l.strip() == "READY" for l in lines), "READY never passed through", out)
    check(proc.returncode == 0, "dtrain-launch exited %d" % proc.returncode, out)
    check("fake_job rank 1 done" in out, "stdout of the other rank missing", out)


# What Open MPI 4.1's mpirun and Open MPI 5.0's prterun print when rank 1 is
# killed, exits 3, or calls MPI_Abort(7) (copied from real runs, PIDs and job
# ids as they were), with the failure dtrain-launch must read from it.
MPIRUN_REPORTS = [
    ("4.1 signal", """\
--------------------------------------------------------------------------
Primary job  terminated normally, but 1 process returned
a non-zero exit code. Per user-direction, the job has been aborted.
--------------------------------------------------------------------------
--------------------------------------------------------------------------
mpiexec noticed that process rank 1 with PID 0 on node vm exited on signal 9 (Killed).
--------------------------------------------------------------------------
""", dict(rank=1, host="vm", signal=9, code=None)),
    ("5.0 signal", """\
--------------------------------------------------------------------------
prterun noticed that process rank 1 with PID 50 on node vm exited on
signal 9 (Killed).
--------------------------------------------------------------------------
""", dict(rank=1, host="vm", signal=9, code=None)),
    ("4.1 exit", """\
--------------------------------------------------------------------------
mpiexec detected that one or more processes exited with non-zero status, thus causing
the job to be terminated. The first process to do so was:

  Process name: [[14614,1],1]
  Exit code:    3
--------------------------------------------------------------------------
""", dict(rank=1, host=None, signal=None, code=3)),
    ("5.0 exit", """\
--------------------------------------------------------------------------
prterun detected that one or more processes exited with non-zero status,
thus causing the job to be terminated. The first process to do so was:

   Process name: [prterun-vm-55@1,1]
   Exit code:    3
--------------------------------------------------------------------------
""", dict(rank=1, host=None, signal=None, code=3)),
    ("4.1 abort", """\
--------------------------------------------------------------------------
MPI_ABORT was invoked on rank 1 in communicator MPI_COMM_WORLD
with errorcode 7.

NOTE: invoking MPI_ABORT causes Open MPI to kill all MPI processes.
You may or may not see output from other processes, depending on
exactly when Open MPI kills them.
--------------------------------------------------------------------------
""", dict(rank=1, host=None, signal=None, code=7)),
    ("5.0 abort", """\
--------------------------------------------------------------------------
MPI_ABORT was invoked on rank 1 in communicator MPI_COMM_WORLD
  Proc: [[51362,1],1]
  Errorcode: 7

NOTE: invoking MPI_ABORT causes Open MPI to kill all MPI processes.
You may or may not see output from other processes, depending on
exactly when Open MPI kills them.
--------------------------------------------------------------------------
--------------------------------------------------------------------------
prterun has exited due to process rank 1 with PID 0 on node vm calling
"abort". This may have caused other processes in the application to be
terminated by signals sent by prterun (as reported here).
--------------------------------------------------------------------------
""", dict(rank=1, host=None, signal=None, code=7)),
]


def case_parse_mpirun_output(c, real):
    loader = importlib.machinery.SourceFileLoader("dtrain_launch", LAUNCH)
    spec = importlib.util.spec_from_file_location("dtrain_launch", LAUNCH, loader=loader)
    launch = importlib.util.module_from_spec(spec)
    loader.exec_module(launch)
    for name, text, want in MPIRUN_REPORTS:
        parser = launch.FailureParser()
        for line in text.splitlines(keepends=True):
            parser.feed(line)
        got = parser.first and {k: parser.first[k] for k in want}
        check(got == want, "Open MPI %s report read as %s, expected %s" % (name, got, want),
              text)


CASES = {
    "fake_usage": case_usage,
    "fake_success": case_success,
    "fake_restart_kill": case_restart_kill,
    "fake_max_restarts": case_max_restarts,
    "fake_exit2": case_exit2,
    "fake_exit2_one_rank_srun": case_exit2_one_rank,
    "fake_stopped_75_restarts": case_stopped_75_restarts,
    "fake_backoff": case_backoff,
    "fake_shrink": case_shrink,
    "fake_shrink_no_divisor": case_shrink_no_divisor,
    "fake_exclude_host": case_exclude_host,
    "fake_exclude_host_srun": case_exclude_host_srun,
    "fake_exclude_keep_ranks": case_exclude_keep_ranks,
    "fake_lost_host_reports": case_lost_host_reports,
    "fake_abort_ends_launcher": case_abort_ends_launcher,
    "fake_launcher_args": case_launcher_args,
    "fake_sigterm": case_sigterm,
    "fake_sigint": case_sigint,
    "fake_live_output": case_live_output,
    "fake_parse_mpirun_output": case_parse_mpirun_output,
    "real_restart_kill": case_restart_kill,
    "real_exit2": case_exit2,
    "real_shrink": case_shrink,
    "real_sigterm": case_sigterm,
    "real_live_output": case_live_output,
}


def main(argv):
    if argv[:1] == ["--list"]:
        print("\n".join(CASES))
        return 0
    if len(argv) != 1 or argv[0] not in CASES:
        sys.stderr.write("usage: launch_test.py CASE  (--list shows them)\n")
        return 2
    name = argv[0]
    real = name.startswith("real_")
    with tempfile.TemporaryDirectory(prefix="dtrain-launch-test.") as tmp:
        c = Case(tmp, real)
        try:
            CASES[name](c, real)
        except Failure as e:
            sys.stderr.write("FAIL %s: %s\n" % (name, e))
            return 1
    print("PASS %s" % name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
