#!/usr/bin/python3
"""A stand-in for the dtrain trainer, run as each rank of an MPI job.

It follows the trainer's exit-code contract: 0 finished, 2 bad usage, 75
stopped cleanly on SIGTERM/SIGINT (after writing a marker file), and it can
fail on purpose on one rank for the first K attempts.

Every start appends a line to STATE/runs.log:
    attempt=A restart_count=C rank=R size=S launch_ranks=L host=H
where A counts the starts of this rank (STATE/starts.rank<R>), C is
DTRAIN_RESTART_COUNT and S the world size seen by the rank.
"""

import argparse
import os
import signal
import socket
import sys
import time


def env_int(*names, default=0):
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return default


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--state", required=True, help="directory for state and marker files")
    p.add_argument("--run", type=float, default=0.3, help="seconds of 'training'")
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--fail-attempts", type=int, default=0,
                   help="fail on --fail-rank during its first K starts")
    p.add_argument("--fail-host", default=None,
                   help="fail on every rank that runs on this host (FAKE_MPI_HOST) during "
                        "its first --fail-attempts starts")
    p.add_argument("--fail-mode", default="kill",
                   help="kill (SIGKILL itself), exit:N, or hang (print --report, then keep "
                        "running --run seconds, ignoring SIGTERM, as a rank stuck in a "
                        "launcher that cannot end the job)")
    p.add_argument("--report", default=None,
                   help="file whose text the failing rank prints on stderr before it fails "
                        "(a launcher's or trainer's failure report)")
    p.add_argument("--exit", type=int, default=0, help="exit code of every rank at the end")
    p.add_argument("--wait-stop", action="store_true",
                   help="run until SIGTERM/SIGINT (at most --run seconds)")
    p.add_argument("--handshake", action="store_true",
                   help="rank 0 prints READY, then waits for STATE/go before finishing")
    a = p.parse_args()

    rank = env_int("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
    size = env_int("OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", default=1)
    host = os.environ.get("FAKE_MPI_HOST") or socket.gethostname().split(".")[0]
    os.makedirs(a.state, exist_ok=True)

    stop = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    signal.signal(signal.SIGINT, lambda s, f: stop.append(s))

    counter = os.path.join(a.state, "starts.rank%d" % rank)
    try:
        with open(counter) as f:
            attempt = int(f.read() or 0)
    except FileNotFoundError:
        attempt = 0
    with open(counter, "w") as f:
        f.write(str(attempt + 1))
    line = "attempt=%d restart_count=%s rank=%d size=%d launch_ranks=%s host=%s\n" % (
        attempt, os.environ.get("DTRAIN_RESTART_COUNT", "-"), rank, size,
        os.environ.get("DTRAIN_LAUNCH_RANKS", "-"), host)
    fd = os.open(os.path.join(a.state, "runs.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, line.encode())
    os.close(fd)
    print("fake_job rank %d/%d attempt %d started" % (rank, size, attempt), flush=True)

    def stopped():
        with open(os.path.join(a.state, "sigterm.rank%d" % rank), "w") as f:
            f.write("signal %d\n" % stop[0])
        print("fake_job rank %d: signal %d, checkpoint written, exiting 75" % (rank, stop[0]),
              flush=True)
        sys.exit(75)

    failing = rank == a.fail_rank or (a.fail_host is not None and host == a.fail_host)
    if failing and attempt < a.fail_attempts:
        time.sleep(0.2)
        print("fake_job rank %d: failing on purpose (%s)" % (rank, a.fail_mode), flush=True)
        if a.report:
            with open(a.report) as f:
                sys.stderr.write(f.read())
            sys.stderr.flush()
        if a.fail_mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if a.fail_mode == "hang":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(a.run)
            sys.exit(1)
        sys.exit(int(a.fail_mode.split(":", 1)[1]))

    if a.handshake and rank == 0:
        print("READY", flush=True)
        go = os.path.join(a.state, "go")
        deadline = time.monotonic() + 60
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                print("fake_job: nobody saw READY", flush=True)
                sys.exit(9)
            time.sleep(0.02)

    if a.wait_stop:
        with open(os.path.join(a.state, "running.rank%d" % rank), "w") as f:
            f.write("%d\n" % os.getpid())
    deadline = time.monotonic() + a.run
    while time.monotonic() < deadline:
        if stop:
            stopped()
        time.sleep(0.02)
    if stop:
        stopped()
    if a.wait_stop:
        print("fake_job rank %d: no stop signal arrived" % rank, flush=True)
        sys.exit(8)
    print("fake_job rank %d done" % rank, flush=True)
    sys.exit(a.exit)


if __name__ == "__main__":
    main()
