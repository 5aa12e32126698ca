"""Run a writer and SIGKILL it just before its N-th write-side system call.

    python crash_runner.py N cli ARGS...        imageformats CLI (imageformats.cli.main(ARGS))
    python crash_runner.py N qcow2 PATH SEED    random writes + flushes through the writable qcow2 device;
                                                prints "FLUSHED <k>" after the k-th write is acknowledged by flush

Counted calls: os.pwrite, os.pwritev, os.write (to regular files), os.fsync, os.fdatasync, os.ftruncate,
os.replace, os.rename.  Before call N the process sends itself SIGKILL (a real kill: no cleanup, no
atexit, the page cache keeps what was written).  N = 0 never kills; the number of counted calls is
printed to stderr as "CALLS <n>" at the end, so a test can walk every kill point 1..n.
"""

import os
import random
import signal
import stat
import sys

N = 0
count = [0]


def _wrap(name):
    orig = getattr(os, name)

    def f(*a, **kw):
        if name == "write":
            try:
                if not stat.S_ISREG(os.fstat(a[0]).st_mode):
                    return orig(*a, **kw)
            except OSError:
                return orig(*a, **kw)
        count[0] += 1
        if count[0] == N:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(*a, **kw)

    setattr(os, name, f)


def install(n: int) -> None:
    global N
    N = n
    for name in ("pwrite", "pwritev", "write", "fsync", "fdatasync", "ftruncate", "replace", "rename"):
        _wrap(name)


def qcow2_writes(path: str, seed: int) -> None:
    from imageformats import detect

    rng = random.Random(seed)
    dev = detect.open(path, format="qcow2", writable=True)
    size = dev.size
    for k in range(1, 13):
        off = rng.randrange(0, size - 1)
        n = rng.randrange(1, min(size - off, 200_000) + 1)
        if rng.random() < 0.8:
            dev.pwrite(bytes([k]) * n, off)
        else:
            dev.zero(n, off)
        if rng.random() < 0.5:
            dev.flush()
            print(f"FLUSHED {k}", flush=True)
    dev.flush()
    print("FLUSHED 12", flush=True)
    dev.close()


def qcow2_plan(size: int, seed: int):
    """The writes qcow2_writes makes: [(k, off, n, fill)] (fill None = zero) and the set of flush points."""
    rng = random.Random(seed)
    out = []
    for k in range(1, 13):
        off = rng.randrange(0, size - 1)
        n = rng.randrange(1, min(size - off, 200_000) + 1)
        fill = k if rng.random() < 0.8 else 0
        out.append((k, off, n, fill))
        rng.random()
    return out


if __name__ == "__main__":
    install(int(sys.argv[1]))
    mode = sys.argv[2]
    if mode == "cli":
        from imageformats.cli import main

        rc = main(sys.argv[3:])
    else:
        qcow2_writes(sys.argv[3], int(sys.argv[4]))
        rc = 0
    print(f"CALLS {count[0]}", file=sys.stderr, flush=True)
    sys.exit(rc)
