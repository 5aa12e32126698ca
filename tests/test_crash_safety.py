"""Crash safety: writers killed with SIGKILL just before their N-th write-side system call
(tests/crash_runner.py), at every such point (LUKS) or at a sample of them (qcow2), then checked
with the real tools.

* LUKS key management (add-key, change-key, remove-key): after every kill some working key remains
  -- `cryptsetup luksOpen --test-passphrase` accepts the other slot's passphrase always, and the old or
  the new passphrase of the slot being changed -- and the payload is untouched.
* qcow2 writes through the writable device: after every kill `qemu-img check` reports no corruption
  and every write acknowledged by a flush reads back (via `qemu-img convert`); bytes of unacknowledged
  writes hold either the flushed value or one of the values written later.
The gzip-patch journal is killed at every write in tests/test_gzip_partial.py.
CRASH_POINTS=all walks every qcow2 kill point and CRASH_SEEDS=N adds workloads (scripts/fuzz-long.sh).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import crash_runner

RUNNER = str(Path(__file__).with_name("crash_runner.py"))


def run_killed(n: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, RUNNER, str(n), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def calls_of(proc) -> int:
    m = re.search(r"CALLS (\d+)", proc.stderr)
    assert m and proc.returncode == 0, proc.stderr
    return int(m.group(1))


def cs_ok(img: Path, keyfile: Path) -> bool:
    return subprocess.run(["cryptsetup", "luksOpen", "--test-passphrase", "--key-file", str(keyfile), str(img)],
                          capture_output=True).returncode == 0


@pytest.fixture
def luks(tmp_path):
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    a.write_bytes(b"passphrase A")
    b.write_bytes(b"passphrase B")
    c.write_bytes(b"passphrase C")
    img = tmp_path / "vol.img"
    with open(img, "wb") as f:
        f.truncate(3 << 20)
    fast = ["--pbkdf-force-iterations", "1000"]
    subprocess.run(["cryptsetup", "luksFormat", "--type", "luks1", "-q", *fast, "-s", "256", "--key-file", str(a),
                    str(img)], check=True, capture_output=True)
    subprocess.run(["cryptsetup", "luksAddKey", *fast, "--key-file", str(a), str(img), str(b)], check=True,
                   capture_output=True)
    with open(img, "r+b") as f:  # payload content the key operations must not touch
        f.seek(2 << 20)
        f.write(random.Random(5).randbytes(1 << 20))
    return img, a, b, c


OPS = {
    # name: (CLI args after the device, must-work key files, one-of key files)
    "add-key": (["--key-file", "{a}", "--new-key-file", "{c}", "--pbkdf-force-iterations", "1000"], ["a", "b"], []),
    "change-key": (["--key-file", "{a}", "--new-key-file", "{c}", "--pbkdf-force-iterations", "1000"], ["b"],
                   ["a", "c"]),
    "remove-key": (["--key-file", "{a}"], ["b"], []),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_luks_key_management_killed_at_every_write(luks, tmp_path, op):
    img, a, b, c = luks
    keys = {"a": a, "b": b, "c": c}
    args, must, one_of = OPS[op]
    args = [x.format(a=a, c=c) for x in args]
    pristine = img.read_bytes()
    work = tmp_path / "work.img"
    work.write_bytes(pristine)
    n = calls_of(run_killed(0, "cli", "luks", op, work, *args))
    assert n >= 1
    # the finished operation did what it says (cryptsetup is the oracle)
    after = {"add-key": {"a": True, "b": True, "c": True}, "change-key": {"a": False, "b": True, "c": True},
             "remove-key": {"a": False, "b": True, "c": False}}[op]
    assert {k: cs_ok(work, v) for k, v in keys.items()} == after
    for k in range(1, n + 1):
        work.write_bytes(pristine)
        r = run_killed(k, "cli", "luks", op, work, *args)
        assert r.returncode == -9, (k, r.returncode, r.stderr)
        for name in must:
            assert cs_ok(work, keys[name]), f"{op} killed before write {k}/{n}: key {name} lost"
        if one_of:
            assert any(cs_ok(work, keys[x]) for x in one_of), f"{op} killed at {k}/{n}: neither {one_of} works"
        assert work.read_bytes()[2 << 20:] == pristine[2 << 20:], "payload changed"


def _flushed(stdout: str) -> int:
    ks = [int(x) for x in re.findall(r"FLUSHED (\d+)", stdout)]
    return max(ks) if ks else 0


@pytest.mark.parametrize("seed", range(int(os.environ.get("CRASH_SEEDS", "2"))))
def test_qcow2_writes_killed(tmp_path, seed):
    size = 4 << 20
    q = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(q), str(size)],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xee 0 1M", "-c", "write -P 0xdd 3M 64k", str(q)],
                   check=True, capture_output=True)
    pristine = q.read_bytes()
    initial = np.zeros(size, np.uint8)
    initial[: 1 << 20] = 0xEE
    initial[3 << 20 : (3 << 20) + 65536] = 0xDD
    plan = crash_runner.qcow2_plan(size, seed)
    n = calls_of(run_killed(0, "qcow2", q, seed))
    points = list(range(1, n + 1))
    if os.environ.get("CRASH_POINTS") != "all":
        points = sorted(random.Random(seed).sample(points, min(len(points), 12)))
    out = tmp_path / "out.raw"
    for k in [None] + points:
        q.write_bytes(pristine)
        r = run_killed(k or 0, "qcow2", q, seed)
        assert r.returncode == (0 if k is None else -9), (k, r.returncode, r.stderr[-2000:])
        done = _flushed(r.stdout)
        chk = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(q)], capture_output=True, text=True)
        # 0: clean; 3: only leaked clusters (space, not data, is lost) -- anything else is corruption
        assert chk.returncode in (0, 3), f"kill point {k}/{n}: {chk.stdout}{chk.stderr}"
        subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(q), str(out)], check=True)
        img = np.fromfile(out, np.uint8)
        model = initial.copy()
        for kk, off, ln, fill in plan[:done]:
            model[off:off + ln] = fill
        ok = img == model
        for kk, off, ln, fill in plan[done:]:
            ok[off:off + ln] |= img[off:off + ln] == fill
        bad = np.flatnonzero(~ok)
        assert bad.size == 0, f"kill point {k}/{n} (flushed through write {done}): first bad byte {bad[0]}"
        if k is None:
            assert done == 12 and (img == model).all()
