"""Helpers for the LUKS tests: drive cryptsetup, qemu-img and nbdkit's luks filter on files."""

from __future__ import annotations

import os
import re
from pathlib import Path

from peers import run, run_qemu_luks

PASSPHRASE = b"correct horse battery staple"


def secret_file(tmp_path: Path, data: bytes, name: str = "pass") -> Path:
    """A secret in a file without a trailing newline (qemu's secret object reads the file whole)."""
    path = tmp_path / name
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def cs_format(img: Path, keyfile: Path, cipher: str = "aes-xts-plain64", key_bits: int | None = None,
              hash_spec: str = "sha256", size: int = 3 << 20, extra: list[str] | None = None) -> None:
    """cryptsetup luksFormat --type luks1 on a fresh sparse file (fast forced iterations)."""
    if size:
        with open(img, "wb") as f:
            f.truncate(size)
    args = ["cryptsetup", "luksFormat", "--type", "luks1", "-q", "--pbkdf-force-iterations", "1000",
            "-c", cipher, "-h", hash_spec, "--key-file", keyfile]
    if key_bits:
        args += ["-s", key_bits]
    run(*args, *(extra or []), img)


def cs_test_passphrase(img: Path, keyfile: Path, *extra) -> bool:
    """True when cryptsetup accepts the key file (luksOpen --test-passphrase needs no root)."""
    proc = run("cryptsetup", "luksOpen", "--test-passphrase", "--key-file", keyfile, *extra, img, check=False)
    return proc.returncode == 0


def cs_dump(img: Path, *extra) -> str:
    return run("cryptsetup", "luksDump", *extra, img).stdout.decode()


def cs_dump_fields(img: Path, *extra) -> dict:
    """cryptsetup luksDump parsed into a dict (header fields and per-slot details)."""
    text = cs_dump(img, *extra)
    out: dict = {"slots": {}}
    slot = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"Key Slot (\d): (ENABLED|DISABLED)", line)
        if m:
            slot = int(m.group(1))
            out["slots"][slot] = {"enabled": m.group(2) == "ENABLED"}
        elif ":" in line and line.strip():
            key, _, value = line.strip().partition(":")
            value = value.strip()
            # hex dumps continue on the following lines, which start with whitespace and hex pairs only
            while i + 1 < len(lines) and re.fullmatch(r"\s+([0-9a-f]{2} ?)+\s*", lines[i + 1]):
                i += 1
                value += " " + lines[i].strip()
            if slot is None:
                out[key.strip()] = value
            else:
                out["slots"][slot][key.strip()] = value
        i += 1
    return out


def hexstr(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


def qemu_write(img: Path, keyfile: Path, raw: Path) -> None:
    """Write raw data into a LUKS image through qemu's luks driver."""
    run("qemu-img", "convert", "-n", "-f", "raw", "--object", f"secret,id=s0,file={keyfile}",
        "--target-image-opts", raw, f"driver=luks,key-secret=s0,file.filename={img}")


def qemu_read(img: Path, keyfile: Path, out: Path) -> bytes:
    """Decrypt a LUKS image to raw with qemu-img; returns the bytes."""
    run("qemu-img", "convert", "--object", f"secret,id=s0,file={keyfile}", "--image-opts",
        f"driver=luks,key-secret=s0,file.filename={img}", "-O", "raw", out)
    return out.read_bytes()


def qemu_create(img: Path, keyfile: Path, size: int, **opts) -> None:
    """qemu-img create -f luks (retrying qemu's flaky PBKDF2 benchmark, see peers.run_qemu_luks)."""
    o = ",".join(["key-secret=s0", "iter-time=10"] + [f"{k.replace('_', '-')}={v}" for k, v in opts.items()])
    run_qemu_luks("qemu-img", "create", "-q", "-f", "luks", "--object", f"secret,id=s0,file={keyfile}", "-o", o,
                  img, size)


def nbdkit_read(img: Path, keyfile: Path, out: Path) -> bytes:
    """Decrypt with nbdkit's luks filter, copied out by nbdcopy."""
    run("nbdcopy", "--", "[", "nbdkit", "file", img, "--filter=luks", f"passphrase=+{keyfile}", "]", out)
    return out.read_bytes()


def nbdkit_write(img: Path, keyfile: Path, raw: Path) -> None:
    """Write raw data through nbdkit's luks filter (nbdcopy raw -> nbdkit)."""
    run("nbdcopy", "--", raw, "[", "nbdkit", "file", img, "--filter=luks", f"passphrase=+{keyfile}", "]")


def random_bytes(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)
