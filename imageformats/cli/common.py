"""Options and helpers shared by the subcommands: secrets, sizes, progress, opening images."""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from typing import Any

from .. import detect
from ..block import BlockDevice
from ..errors import InvalidArgumentError, NotFoundError, SecretRequiredError

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str) -> int:
    """``1G``, ``512M``, ``4096``, ``1.5G``, ``2GiB`` -> bytes (qemu-img units: powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtpeb]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise InvalidArgumentError(f"invalid size {text!r} (examples: 4096, 512M, 10G)")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if value != int(value):
        raise InvalidArgumentError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def parse_options(values: list[str] | None) -> dict[str, str]:
    """``-o a=1,b=2 -o c=3`` -> {"a": "1", "b": "2", "c": "3"} (qemu-img -o syntax)."""
    out: dict[str, str] = {}
    for value in values or []:
        for item in value.split(","):
            if not item:
                continue
            key, sep, val = item.partition("=")
            if not sep:
                raise InvalidArgumentError(f"option {item!r} is not KEY=VALUE")
            out[key.strip().replace("-", "_")] = val
    return out


def add_secret_arguments(parser: argparse.ArgumentParser) -> None:
    """Options for secrets, on every command that opens images.  Never a secret in argv."""
    group = parser.add_argument_group("secrets (never given on the command line itself)")
    group.add_argument("--passphrase-file", metavar="FILE",
                       help="read the passphrase from the first line of FILE ('-' = stdin)")
    group.add_argument("--key-file", metavar="FILE",
                       help="use FILE's bytes, newlines included, as the key ('-' = stdin)")
    group.add_argument("--keyfile-offset", type=int, default=0, metavar="N", help="skip N bytes of the key file")
    group.add_argument("--keyfile-size", type=int, default=None, metavar="N", help="read at most N bytes of the key file")
    group.add_argument("--volume-key-file", metavar="FILE", help="unlock with the raw volume (master) key in FILE")
    group.add_argument("--key-slot", type=int, default=None, metavar="N", help="try only key slot N")


def _read_secret_file(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidArgumentError(f"{path}: is a directory") from None


def read_passphrase_file(path: str) -> bytes:
    """The first line of a passphrase file, without its newline (like a passphrase typed at a prompt)."""
    data = _read_secret_file(path)
    return data.split(b"\n", 1)[0].removesuffix(b"\r")


def read_key_file(path: str, offset: int = 0, size: int | None = None) -> bytes:
    """A key file's bytes, whole and binary (cryptsetup --key-file semantics)."""
    data = _read_secret_file(path)
    if offset < 0 or (size is not None and size < 0):
        raise InvalidArgumentError("--keyfile-offset and --keyfile-size must not be negative")
    data = data[offset:]
    if size is not None:
        if len(data) < size:
            raise InvalidArgumentError(f"key file holds {len(data)} bytes after the offset, fewer than --keyfile-size {size}")
        data = data[:size]
    return data


def secrets_from_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "passphrase_file", None):
        out["passphrase"] = read_passphrase_file(args.passphrase_file)
    if getattr(args, "key_file", None):
        out["key_file"] = read_key_file(args.key_file, args.keyfile_offset, args.keyfile_size)
    if getattr(args, "volume_key_file", None):
        out["volume_key"] = _read_secret_file(args.volume_key_file)
    if getattr(args, "key_slot", None) is not None:
        out["key_slot"] = args.key_slot
    return out


def open_image(args: argparse.Namespace, path: str, *, writable: bool = False, fmt: str | None = None,
               **extra: Any) -> BlockDevice:
    """Open an image with the command's secrets; prompt for a passphrase on a terminal."""
    options = {**secrets_from_args(args), **extra}
    try:
        return detect.open(path, format=fmt, writable=writable, **options)
    except SecretRequiredError:
        if not sys.stdin.isatty():
            raise SecretRequiredError(
                f"{path} is encrypted: give --passphrase-file FILE or --key-file FILE") from None
        options["passphrase"] = getpass.getpass(f"Enter passphrase for {path}: ").encode()
        return detect.open(path, format=fmt, writable=writable, **options)


class Progress:
    """qemu-img style ``(12.34/100%)`` progress on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._last = -1.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        pct = 100.0 * done / total if total else 100.0
        if pct - self._last >= 0.01 or done == total:
            self._last = pct
            sys.stderr.write(f"    ({pct:.2f}/100%)\r")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def human_size(n: int) -> str:
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.3g} {unit}"
    return f"{n} B"


def stdout_binary():
    return sys.stdout.buffer if hasattr(sys.stdout, "buffer") else os.fdopen(1, "wb")
