"""
infra/rundir.py -- the run folder and the run's life: the folder's lock, how files in it are
written (whole lines, atomic replaces), the stop signals, and the exit path.

One run owns its --output-dir: rank 0 locks it for as long as the process lives, and a folder
holding an earlier run is refused unless --resume or --overwrite says what to do with it. A stop
request (SIGTERM, SIGINT, SIGUSR1: what schedulers send ahead of a time limit) only sets a flag;
the loop checks it at safe points, every rank agrees, a checkpoint is written and the run exits 0
within torchrun's grace. finishes() and run() wrap calibrl's main: whatever ends it, the handlers
are restored, the folder unlocked, the process group closed, and a timed-out collective is one
line, not a traceback. Apart because none of this is the algorithm and all of it is what an
engineer chasing a failed run at scale opens first.
"""
import os
import re
import signal
import time

import torch

from infra import distributed

class Abandon(Exception):
    """A stop request agreed by every rank while the step's weights have not moved yet."""


class StopRequest:
    """SIGTERM, SIGINT and SIGUSR1 (which schedulers send ahead of a time limit) set a flag instead
    of killing the run. requested() is this rank's flag (no collective: generation polls it to end
    early); agreed() asks every rank (a collective); check() raises Abandon once agreed."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.flag, self.handlers = [], {}

    def install(self):
        self.flag.clear()
        self.handlers = {sig: signal.signal(sig, lambda *_: self.flag.append(1))
                         for sig in self.SIGNALS}

    def restore(self):
        for sig, h in self.handlers.items():
            signal.signal(sig, h)
        self.handlers = {}

    def requested(self):
        return bool(self.flag)

    def agreed(self):
        return distributed.all_max(len(self.flag)) > 0

    def check(self):
        if self.agreed():
            raise Abandon()


STOP = StopRequest()  # signals are per process: one flag for the whole run



def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def append_line(path, line):
    """Append one whole line: if the write fails (a full disk), cut the file back to where it was
    and stop with a clear message; the newest checkpoint stays the place to resume from."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
        _write_all(fd, line.encode())
    except OSError as e:
        os.ftruncate(fd, size)
        raise SystemExit(f"error: cannot write {path} ({e.strerror or e}); the metrics are as they "
                         "were, and --resume continues from the newest checkpoint")
    finally:
        os.close(fd)


def write_atomic(path, data):
    """Replace a file's contents through a temporary file and a rename: a crash keeps the old."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


RUN_FILES = re.compile(r"metrics\.jsonl|checkpoint-\d+(\.tmp)?|events\.out\.tfevents\..*")
_LOCKS = {}  # abspath of a locked run folder -> the fd holding its flock


def _drop_locks_in_child():
    """A forked child (the answer checker's worker) shares the lock's open file: had it kept it,
    the lock would outlive the run (a second in-process run on the folder refused). The child
    closes its copies; the parent's lock stands."""
    for fd in _LOCKS.values():
        os.close(fd)
    _LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def prepare_output_dir(args, rank):
    """--output-dir, default runs/<algo>-<timestamp>; every rank uses rank 0's. Rank 0 locks it for
    the run (a second run on it stops at once). A folder holding an earlier run's files is refused
    unless --resume (continue it) or --overwrite (clear it first) is given."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = args.output_dir or os.path.join("runs", f"{args.algo}-{stamp}")
    if distributed.active():
        box = [out_dir]
        torch.distributed.broadcast_object_list(box)
        out_dir = box[0]
    problem = None
    if rank == 0:
        try:
            os.makedirs(out_dir, exist_ok=True)
            problem = _lock(out_dir)
        except OSError as e:
            problem = f"cannot be used ({e.strerror or e})"
        names = [] if problem else os.listdir(out_dir)
        earlier = sorted(f for f in names if RUN_FILES.fullmatch(f))
        if earlier and not (args.resume or args.overwrite or args.eval_only):
            problem = (f"holds an earlier run ({', '.join(earlier[:3])}"
                       f"{' ...' if len(earlier) > 3 else ''}); pass --resume to continue it or "
                       "--overwrite to start afresh")
        if earlier and args.overwrite and not args.resume and not problem:
            import shutil
            for f in earlier:
                p = os.path.join(out_dir, f)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    box = [problem]
    if distributed.active():
        torch.distributed.broadcast_object_list(box)
    if box[0]:
        release(out_dir)
        raise SystemExit(f"error: output folder {out_dir} {box[0]}")
    return out_dir


def _lock(out_dir):
    """An exclusive lock on out_dir/.lock for as long as the run lasts (the OS drops it when the
    process ends, however it ends); -> None, or why it cannot be had."""
    import fcntl
    release(out_dir)  # this process's earlier run on the folder (in-process callers, tests)
    fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return "is in use by another run (it holds .lock); wait for it or pick another folder"
    _LOCKS[os.path.abspath(out_dir)] = fd
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return None


def release(out_dir):
    fd = _LOCKS.pop(os.path.abspath(out_dir), None)
    if fd is not None:
        os.close(fd)


def finishes(main):
    """main, which however it ends (returns, SystemExit, an error) restores the signal handlers,
    unlocks its output folder and closes the process group."""
    import functools

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        finally:
            STOP.restore()
            for path in list(_LOCKS):
                release(path)
            distributed.close()
    return wrapped


def run(main):
    """`python calibrl.py` / torchrun: main(), with a collective that timed out (a frozen or dead
    peer, --dist-timeout) turned into one line and exit code 1 instead of a traceback."""
    try:
        main()
    except (RuntimeError, torch.distributed.DistError) as e:
        text, rank = str(e).lower(), os.environ.get("RANK", "0")
        if "timed out" in text or "timeout" in text:
            raise SystemExit(f"error: rank {rank}: a collective waited longer than --dist-timeout "
                             f"for another rank (frozen?): {str(e).splitlines()[0][:200]}")
        if "closed by peer" in text or "connection reset" in text:
            raise SystemExit(f"error: rank {rank}: another rank is gone (see its own message)")
        raise
