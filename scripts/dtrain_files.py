"""Shared by plot_metrics.py and merge_traces.py: turning the directories and
files given on the command line into the per-rank files to read."""
import os


class InputError(Exception):
    """Bad input: reported on stderr, exit status 2."""


def expand_paths(paths, file_re, describe, select=None):
    """The files named by `paths`, in order. A directory stands for its files
    whose names match `file_re` (sorted), filtered by `select(dir, names)`
    when given; `describe` names them in errors, e.g. "trace files
    (trace-rank<RRRRR>.json)"."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(f for f in os.listdir(p) if file_re.match(f))
            if not found:
                raise InputError(f"{p}: no {describe} in this directory")
            files.extend(os.path.join(p, f) for f in (select(p, found) if select else found))
        elif os.path.exists(p):
            if not os.path.isfile(p):
                raise InputError(f"{p}: not a regular file or directory")
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or directory")
    return files
