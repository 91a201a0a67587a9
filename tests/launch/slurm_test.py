#!/usr/bin/python3
"""Tests of scripts/launch/dtrain.sbatch + dtrain-launch on the single-node
Slurm of scripts/launch/slurm-local.sh.

Usage: slurm_test.py CASE
  start                 start the local Slurm unless it runs (ctest fixture setup);
                        remembers in $DTRAIN_SLURM_TEST_MARK that it started it
  stop                  stop it again if `start` started it (fixture cleanup)
  restart_srun          2-rank fake job failing once on its first attempt:
  restart_mpirun          restarted and finished (DTRAIN_LAUNCHER=mpirun for the second)
  scancel_srun          `scancel --batch --signal=TERM` of a running job: the ranks
  scancel_mpirun          get SIGTERM, write their marker, the job ends with 75
  start_failure         slurmd fails to start (a fake slurmd first on PATH): the start
                        fails, shows slurmd's last log lines and leaves no daemon it
                        started running (its own directory and port, no fixture)
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.realpath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LAUNCH_DIR = os.path.join(ROOT, "scripts", "launch")
SLURM_LOCAL = os.path.join(LAUNCH_DIR, "slurm-local.sh")
SBATCH_SCRIPT = os.path.join(LAUNCH_DIR, "dtrain.sbatch")
FAKE_JOB = os.path.join(HERE, "fake_job.py")
SLURM_DIR = os.environ.setdefault("DTRAIN_SLURM_DIR", "/tmp/dtrain-slurm")
os.environ["SLURM_CONF"] = os.path.join(SLURM_DIR, "slurm.conf")
os.environ["PATH"] += ":/usr/sbin:/sbin"
MARK = os.environ.get("DTRAIN_SLURM_TEST_MARK", os.path.join(SLURM_DIR, "started-by-tests"))
HANG = 90


class Failure(Exception):
    pass


def check(cond, message, output=None):
    if not cond:
        if output is not None:
            sys.stderr.write("---- job output ----\n%s\n--------------------\n" % output)
        raise Failure(message)


def require_slurm():
    missing = [c for c in ("sbatch", "squeue", "scancel", "srun", "slurmctld", "slurmd",
                           "munged") if not shutil.which(c)]
    if missing:
        raise Failure("Slurm is not installed (missing: %s). Run scripts/setup.sh, which "
                      "installs the Debian packages slurmctld slurmd slurm-client munge."
                      % " ".join(missing))


def slurm_local(action):
    return subprocess.run([SLURM_LOCAL, action], timeout=HANG).returncode


def case_start():
    require_slurm()
    if slurm_local("status") == 0:
        return
    if os.path.exists(MARK):
        os.remove(MARK)
    check(slurm_local("start") == 0, "scripts/launch/slurm-local.sh start failed")
    os.makedirs(os.path.dirname(MARK), exist_ok=True)
    open(MARK, "w").close()


def case_stop():
    if os.path.exists(MARK):
        os.remove(MARK)
        check(slurm_local("stop") == 0, "scripts/launch/slurm-local.sh stop failed")


def sbatch(tmp, name, env_extra, job_args, wait=True):
    out = os.path.join(tmp, "job.out")
    env = dict(os.environ, DTRAIN_BACKOFF="0.1", DTRAIN_LAUNCH_LOG=os.path.join(tmp, "launch.jsonl"))
    env.update(env_extra)
    for k in list(env):
        if k.startswith("SLURM_") and k != "SLURM_CONF":
            del env[k]  # not inside another job
    cmd = ["sbatch", "-N", "1", "-n", "2", "-J", name, "-o", out, "--time=5"]
    if wait:
        cmd.append("--wait")
    cmd += [SBATCH_SCRIPT, FAKE_JOB, "--state", os.path.join(tmp, "state")] + job_args
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True), out


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def restart_case(tmp, launcher):
    p, out = sbatch(tmp, "dtrain-test-restart", {"DTRAIN_LAUNCHER": launcher},
                    ["--fail-rank", "1", "--fail-attempts", "1"])
    sb_out, _ = p.communicate(timeout=HANG)
    text = read(out)
    check(p.returncode == 0, "sbatch --wait exited %d: %s" % (p.returncode, sb_out), text)
    check(re.search(r"attempt 0 failed .*rank 1 .*signal 9", text), "no failure logged", text)
    check(re.search(r"restart 1 of 3 in 0.1s with 2 ranks", text), "no restart logged", text)
    check("attempt 1 finished successfully" in text, "no success logged", text)
    if launcher == "srun":
        check("srun --mpi=pmix -n 2" in text, "srun was not used", text)
    else:
        check("dtrain-mpirun -n 2" in text, "mpirun was not used", text)
    check(text.count("fake_job rank 0/2 attempt") == 2, "expected 2 attempts of rank 0", text)


def scancel_case(tmp, launcher):
    name = "dtrain-test-scancel-%d" % os.getpid()
    p, out = sbatch(tmp, name, {"DTRAIN_LAUNCHER": launcher},
                    ["--wait-stop", "--run", "60"])
    state = os.path.join(tmp, "state")
    try:
        deadline = time.monotonic() + HANG
        while not all(os.path.exists(os.path.join(state, "running.rank%d" % r)) for r in (0, 1)):
            check(p.poll() is None, "the job ended before its ranks were running", read(out))
            check(time.monotonic() < deadline, "timed out waiting for the ranks", read(out))
            time.sleep(0.1)
        jobs = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True,
                              text=True, timeout=HANG).stdout.split()
        check(len(jobs) == 1, "squeue found jobs %s" % jobs)
        subprocess.run(["scancel", "--batch", "--signal=TERM", jobs[0]], check=True,
                       timeout=HANG)
        sb_out, _ = p.communicate(timeout=HANG)
    finally:
        if p.poll() is None:
            p.kill()
    text = read(out)
    for r in (0, 1):
        check(os.path.exists(os.path.join(state, "sigterm.rank%d" % r)),
              "rank %d got no SIGTERM (no marker)" % r, text)
    check(p.returncode == 75, "sbatch --wait exited %d, expected 75 (clean stop): %s"
          % (p.returncode, sb_out), text)
    check("ended with exit code 75 after the stop request; not restarting" in text,
          "the supervisor did not report a clean stop", text)
    check(text.count("fake_job rank 0/2 attempt") == 1, "the job was restarted", text)


FAKE_SLURMD = {
    # Fails at once, as slurmd does without a cgroup file system.
    "exits": """#!/bin/sh
echo "slurmd: error: fake slurmd: no cgroup file system mounted" >> "$DTRAIN_SLURM_DIR/slurmd.log"
exit 1
""",
    # Goes to the background (pid file written), then dies.
    "dies": """#!/bin/sh
echo "slurmd: error: fake slurmd: died after starting" >> "$DTRAIN_SLURM_DIR/slurmd.log"
sh -c 'echo $$ > "$DTRAIN_SLURM_DIR/slurmd.pid"; sleep 1' > /dev/null 2>&1 &
exit 0
""",
}


def processes(name, needle=""):
    """Pids of processes called `name` whose command line holds `needle`."""
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % pid) as f:
                comm = f.read().strip()
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if comm == name and needle in cmdline:
            out.add(int(pid))
    return out


def case_start_failure():
    require_slurm()
    with tempfile.TemporaryDirectory(prefix="dtrain-slurm-fail.") as tmp:
        for variant, script in FAKE_SLURMD.items():
            slurm_dir = os.path.join(tmp, variant)
            bin_dir = os.path.join(tmp, "bin-" + variant)
            os.makedirs(bin_dir)
            fake = os.path.join(bin_dir, "slurmd")
            with open(fake, "w") as f:
                f.write(script)
            os.chmod(fake, 0o755)
            env = dict(os.environ, DTRAIN_SLURM_DIR=slurm_dir, DTRAIN_SLURM_PORT="6917",
                       SLURM_CONF=os.path.join(slurm_dir, "slurm.conf"),
                       PATH=bin_dir + ":" + os.environ["PATH"])
            munged_before = processes("munged")
            try:
                p = subprocess.run([SLURM_LOCAL, "start"], env=env, capture_output=True,
                                   text=True, timeout=HANG)
                text = p.stdout + p.stderr
                check(p.returncode != 0, "%s: the start succeeded with a failing slurmd" % variant,
                      text)
                check("fake slurmd" in text,
                      "%s: slurmd's log lines are not in the output" % variant, text)
                left = processes("slurmctld", slurm_dir)
                check(not left, "%s: slurmctld %s is still running" % (variant, sorted(left)),
                      text)
                new_munged = processes("munged") - munged_before
                check(not new_munged, "%s: the munged it started (%s) is still running"
                      % (variant, sorted(new_munged)), text)
                print("ok: %s\n%s" % (variant, text))
            finally:
                subprocess.run([SLURM_LOCAL, "stop"], env=env, timeout=HANG,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


CASES = {
    "start": case_start,
    "start_failure": case_start_failure,
    "stop": case_stop,
    "restart_srun": lambda: with_tmp(restart_case, "srun"),
    "restart_mpirun": lambda: with_tmp(restart_case, "mpirun"),
    "scancel_srun": lambda: with_tmp(scancel_case, "srun"),
    "scancel_mpirun": lambda: with_tmp(scancel_case, "mpirun"),
}


def with_tmp(fn, launcher):
    require_slurm()
    check(slurm_local("status") == 0,
          "the local Slurm is not running (scripts/launch/slurm-local.sh start)")
    with tempfile.TemporaryDirectory(prefix="dtrain-slurm-test.") as tmp:
        os.chmod(tmp, 0o755)
        fn(tmp, launcher)


def main(argv):
    if len(argv) != 1 or argv[0] not in CASES:
        sys.stderr.write("usage: slurm_test.py %s\n" % "|".join(CASES))
        return 2
    try:
        CASES[argv[0]]()
    except Failure as e:
        sys.stderr.write("FAIL %s: %s\n" % (argv[0], e))
        return 1
    print("PASS %s" % argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
