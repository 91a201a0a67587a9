#!/usr/bin/python3
"""A stand-in for Open MPI 4.1's mpirun (or, when called as `srun`, for
Slurm 22.05's srun), for fast tests of dtrain-launch.

Starts -n N copies of PROGRAM with OMPI_COMM_WORLD_RANK/SIZE set, maps ranks
to the hosts of --host H:S,... by slot (exported as FAKE_MPI_HOST; all ranks
still run here), and when a rank fails prints the same messages as the real
mpirun, stops the other ranks and exits with the rank's status. SIGTERM/SIGINT
are forwarded to the ranks as SIGTERM, after which it exits 1 (as mpirun does).

As srun: hosts come from SLURM_JOB_NODELIST (comma list) and
SLURM_TASKS_PER_NODE less --exclude; a failure is reported as
"srun: error: HOST: task R: Killed" and the other tasks are terminated, which
makes srun exit 143 whatever the first failure was.
"""

import os
import signal
import socket
import subprocess
import sys
import time

BAR = "-" * 74


def main(argv):
    srun = "srun" in os.path.basename(sys.argv[0])
    n, hosts, i, exclude = 1, None, 0, []
    while i < len(argv):
        a = argv[i]
        if a.startswith("--exclude="):
            exclude = a.split("=", 1)[1].split(",")
            i += 1
        elif a in ("-n", "-np", "--np", "-c"):
            n = int(argv[i + 1])
            i += 2
        elif a in ("--host", "-H"):
            hosts = argv[i + 1]
            i += 2
        elif a in ("--bind-to", "--map-by", "--hostfile", "-x"):
            i += 2
        elif a in ("--mca", "-mca"):
            i += 3
        elif a.startswith("-"):
            i += 1
        else:
            break
    program = argv[i:]
    if not program:
        sys.stderr.write("fake mpirun: no program\n")
        return 1
    names = []
    if srun and os.environ.get("SLURM_JOB_NODELIST"):
        per = os.environ.get("SLURM_TASKS_PER_NODE", "1(x99)")
        count, _, times = per.partition("(x")
        nodes = os.environ["SLURM_JOB_NODELIST"].split(",")
        for h in nodes:
            if h not in exclude:
                names += [h] * int(count)
    elif hosts:
        for item in hosts.split(","):
            h, _, s = item.partition(":")
            names += [h] * int(s or 1)
    local = socket.gethostname().split(".")[0]

    procs = []
    for r in range(n):
        env = dict(os.environ, OMPI_COMM_WORLD_RANK=str(r), OMPI_COMM_WORLD_SIZE=str(n),
                   OMPI_COMM_WORLD_LOCAL_RANK=str(r),
                   FAKE_MPI_HOST=names[r] if r < len(names) else local)
        procs.append(subprocess.Popen(program, env=env, start_new_session=True))

    terminated = []

    def on_signal(signum, frame):
        terminated.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    status = 0
    running = True
    while running and status == 0:
        running = any(p.poll() is None for p in procs)
        for r, p in enumerate(procs):
            rc = p.poll()
            if rc is None or rc == 0 or status:
                continue
            host = names[r] if r < len(names) else local
            if srun:
                what = ("Killed" if rc == -9 else "Exited with exit code %d" % rc
                        if rc > 0 else signal.strsignal(-rc))
                sys.stderr.write("srun: error: %s: task %d: %s\n" % (host, r, what))
                status = 143
                continue
            sys.stderr.write(
                "%s\nPrimary job  terminated normally, but 1 process returned\n"
                "a non-zero exit code. Per user-direction, the job has been aborted.\n%s\n"
                % (BAR, BAR))
            if rc < 0:
                sig = -rc
                sys.stderr.write(
                    "%s\nmpirun noticed that process rank %d with PID 0 on node %s exited "
                    "on signal %d (%s).\n%s\n"
                    % (BAR, r, host, sig, signal.strsignal(sig).split(":")[0], BAR))
                status = 128 + sig
            else:
                sys.stderr.write(
                    "%s\nmpirun detected that one or more processes exited with non-zero "
                    "status, thus causing\nthe job to be terminated. The first process to "
                    "do so was:\n\n  Process name: [[4242,1],%d]\n  Exit code:    %d\n%s\n"
                    % (BAR, r, rc, BAR))
                status = rc
            sys.stderr.flush()
        if running:
            time.sleep(0.02)
    if status:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p in procs:
        p.wait()
    if terminated:
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
