"""Running the reference tools (qemu-img, cryptsetup, nbdkit, xz...) from tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess


def tool(name: str) -> str:
    """Path of a reference tool; the suite installs them, so a missing one is a failure."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        raise AssertionError(f"reference tool {name!r} is not installed (run scripts/install-peers.sh)")
    return path


def run(*args, input: bytes | None = None, check: bool = True, env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a tool; on failure the assertion shows its stderr."""
    cmd = [tool(args[0]), *map(str, args[1:])]
    proc = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return proc


def qemu_img_map(path, fmt: str | None = None) -> list[dict]:
    args = ["qemu-img", "map", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    return json.loads(run(*args, path).stdout)


def qemu_extents_as_ours(entries: list[dict]) -> list[tuple[int, int, bool, bool]]:
    """qemu-img map JSON -> merged (start, length, zero, hole) with NBD base:allocation meaning.

    hole = nothing stored ("data": false, as qemu-nbd maps BDRV_BLOCK_DATA to NBD_STATE_HOLE):
    unallocated qcow2 clusters ("present": false), qcow2 zero clusters, and a raw file's
    SEEK_HOLE holes (which qemu-img 7.2 prints as "present": true, "data": false with an
    "offset"); zero = reads as zeroes.
    """
    out: list[tuple[int, int, bool, bool]] = []
    for e in entries:
        zero = bool(e["zero"])
        hole = zero and not e["data"]
        item = (e["start"], e["length"], zero, hole)
        if out and out[-1][0] + out[-1][1] == item[0] and out[-1][2:] == item[2:]:
            prev = out.pop()
            item = (prev[0], prev[1] + item[1], zero, hole)
        out.append(item)
    return out


def run_qemu_luks(*args, attempts: int = 30, **kwargs) -> subprocess.CompletedProcess:
    """Run a qemu-img command that creates LUKS key material (``-f luks``, ``encrypt.format=luks``).

    qemu 7.2 benchmarks PBKDF2 first and, on a loaded machine, sometimes fails with "Unable to
    get accurate CPU usage".  That one error is retried; any other failure fails at once.
    """
    for _ in range(attempts):
        proc = run(*args, check=False, **kwargs)
        if proc.returncode == 0 or b"accurate CPU usage" not in proc.stderr:
            break
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate a server started by a test; kill it if it does not exit in time; close its pipes."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def sparse_file(path, size: int, islands=()) -> None:
    """A sparse raw file of ``size`` bytes (truncate) with random data at each (offset, length) island."""
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)
    with open(path, "r+b") as f:
        for offset, length in islands:
            f.seek(offset)
            f.write(os.urandom(length))
