"""``imageformats luks ACTION ...``: LUKS1 volume management named after cryptsetup's actions.

    imageformats luks format FILE [--size SIZE] [--cipher aes-xts-plain64] [--key-size BITS]
                              [--hash sha256] [--iter-time MS | --pbkdf-force-iterations N]
                              [--uuid U] [--header HDR] --new-passphrase-file F | --new-key-file F
    imageformats luks dump FILE [--dump-volume-key --passphrase-file F] [--output json]
    imageformats luks add-key FILE --passphrase-file OLD --new-passphrase-file NEW [--key-slot N]
    imageformats luks remove-key FILE --passphrase-file F [--force]
    imageformats luks kill-slot FILE N (--passphrase-file F | --force)
    imageformats luks change-key FILE --passphrase-file OLD --new-passphrase-file NEW
    imageformats luks header-backup FILE --header-backup-file OUT
    imageformats luks header-restore FILE --header-backup-file IN
    imageformats luks uuid FILE [--uuid U]

Secrets come from files (``-`` = stdin), never from the command line; on a terminal the
passphrase is prompted for when no file is given.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from ..block import BlockDevice, FileDevice
from ..errors import InvalidArgumentError, SecretRequiredError
from .common import parse_size

ACTIONS = ("format", "dump", "add-key", "remove-key", "kill-slot", "change-key", "header-backup",
           "header-restore", "uuid")


# -- secret options (shared with `convert -O luks`) ----------------------------------------


#: cryptsetup's default limit for key files read whole (--keyfile-size raises it).
MAX_KEY_FILE = 8 << 20


def _read_file(path: str, limit: int = MAX_KEY_FILE, what: str = "secret file") -> bytes:
    """A file's bytes, at most ``limit`` (``-`` = stdin); a bigger file is an error, not a hang."""
    if path == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise InvalidArgumentError(f"{what} {path} is larger than {limit} bytes")
    return data


def read_passphrase_file(path: str) -> bytes:
    """The first line of a passphrase file, without its newline (like a passphrase typed at a prompt)."""
    return _read_file(path, what="passphrase file").split(b"\n", 1)[0].removesuffix(b"\r")


def _read_prefix(path: str, n: int) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(n)
    with open(path, "rb") as f:
        return f.read(n)


def read_key_file(path: str, offset: int = 0, size: int | None = None) -> bytes:
    """A key file's bytes, whole and binary, from ``offset``, ``size`` of them if given (cryptsetup semantics).

    Without ``size`` the file may hold at most 8 MiB after the offset (cryptsetup's default limit).
    """
    if offset < 0 or (size is not None and size < 0):
        raise InvalidArgumentError("--keyfile-offset and --keyfile-size must not be negative")
    if size is None:
        data = _read_file(path, offset + MAX_KEY_FILE, "key file")[offset:]
    else:
        data = _read_prefix(path, offset + size)[offset:]
        if len(data) < size:
            raise InvalidArgumentError(
                f"key file holds {len(data)} bytes after the offset, fewer than --keyfile-size {size}")
    return data


def add_unlock_arguments(p: argparse.ArgumentParser, key_slot_help: str | None) -> None:
    g = p.add_argument_group("existing secret (from files, never the command line)")
    g.add_argument("--passphrase-file", metavar="FILE", help="passphrase: the first line of FILE ('-' = stdin)")
    g.add_argument("--key-file", "-d", metavar="FILE", help="key file: FILE's bytes, newlines included ('-' = stdin)")
    g.add_argument("--keyfile-offset", type=int, default=0, metavar="N", help="skip N bytes of the key file")
    g.add_argument("--keyfile-size", type=int, default=None, metavar="N", help="use N bytes of the key file")
    g.add_argument("--volume-key-file", "--master-key-file", metavar="FILE",
                   help="the raw volume key in FILE instead of a passphrase")
    if key_slot_help:
        g.add_argument("--key-slot", "-S", type=int, default=None, metavar="N", help=key_slot_help)


def add_new_secret_arguments(p: argparse.ArgumentParser) -> None:
    """``--new-passphrase-file`` / ``--new-key-file`` (+ offset/size): the secret of a new key slot."""
    g = p.add_argument_group("new secret (from files, never the command line)")
    g.add_argument("--new-passphrase-file", metavar="FILE", help="new passphrase: the first line of FILE")
    g.add_argument("--new-key-file", metavar="FILE", help="new key file: FILE's bytes, newlines included")
    g.add_argument("--new-keyfile-offset", type=int, default=0, metavar="N", help="skip N bytes of the new key file")
    g.add_argument("--new-keyfile-size", type=int, default=None, metavar="N", help="use N bytes of the new key file")


def new_secret_from_args(args: argparse.Namespace) -> dict[str, bytes]:
    """{"new_passphrase": ...} or {"new_key_file": ...} from the --new-* options (empty if none)."""
    if getattr(args, "new_passphrase_file", None) and getattr(args, "new_key_file", None):
        raise InvalidArgumentError("give either --new-passphrase-file or --new-key-file, not both")
    if getattr(args, "new_passphrase_file", None):
        return {"new_passphrase": read_passphrase_file(args.new_passphrase_file)}
    if getattr(args, "new_key_file", None):
        return {"new_key_file": read_key_file(args.new_key_file, args.new_keyfile_offset, args.new_keyfile_size)}
    return {}


def _unlock_secrets(args: argparse.Namespace, *, prompt: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.passphrase_file:
        out["passphrase"] = read_passphrase_file(args.passphrase_file)
    if args.key_file:
        out["key_file"] = read_key_file(args.key_file, args.keyfile_offset, args.keyfile_size)
    if args.volume_key_file:
        out["volume_key"] = _read_file(args.volume_key_file)
    if not out and prompt is not None:
        if not sys.stdin.isatty():
            raise SecretRequiredError("give --passphrase-file FILE, --key-file FILE or --volume-key-file FILE")
        out["passphrase"] = getpass.getpass(prompt).encode()
    return out


def _new_secret(args: argparse.Namespace, *, fallback_to_unlock: bool = False) -> bytes:
    new = new_secret_from_args(args)
    if new:
        return next(iter(new.values()))
    if fallback_to_unlock:  # `luks format --passphrase-file F` like `cryptsetup luksFormat --key-file F`
        if args.passphrase_file and args.key_file:
            raise InvalidArgumentError("give either --passphrase-file or --key-file, not both")
        if args.passphrase_file:
            return read_passphrase_file(args.passphrase_file)
        if args.key_file:
            return read_key_file(args.key_file, args.keyfile_offset, args.keyfile_size)
    if not sys.stdin.isatty():
        raise SecretRequiredError("give the new secret with --new-passphrase-file FILE or --new-key-file FILE")
    first = getpass.getpass("Enter new passphrase: ").encode()
    if getpass.getpass("Verify passphrase: ").encode() != first:
        raise InvalidArgumentError("passphrases do not match")
    return first


# -- parser ---------------------------------------------------------------------------------


def _pbkdf_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iter-time", "-i", type=float, default=None, metavar="MS",
                   help="PBKDF2 time for the new key slot in milliseconds (default 2000, benchmarked)")
    g.add_argument("--pbkdf-force-iterations", type=int, default=None, metavar="N",
                   help="use exactly N PBKDF2 iterations (at least 1000)")


def _volume_command(acts, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand on an existing volume: DEVICE plus --header for a detached header."""
    p = acts.add_parser(name, allow_abbrev=False, help=help)
    p.add_argument("device")
    p.add_argument("--header", default=None, metavar="HDR", help="detached header file")
    return p


def register(sub) -> None:
    p = sub.add_parser("luks", help="LUKS1 volumes: format, dump, key management (cryptsetup-like)")
    acts = p.add_subparsers(dest="luks_action", metavar="ACTION", required=True)

    f = acts.add_parser("format", allow_abbrev=False, help="create a LUKS1 volume (luksFormat)")
    f.add_argument("device", help="the file (created when --size is given) or block device")
    f.add_argument("--size", help="create FILE with this payload size (4096, 512M, 10G)")
    f.add_argument("--cipher", "-c", default="aes-xts-plain64",
                   help="cipher spec (default aes-xts-plain64; aes-cbc-essiv:sha256, aes-cbc-plain64, aes-ecb...)")
    f.add_argument("--key-size", "-s", type=int, default=None, metavar="BITS",
                   help="volume key size in bits (default 512 for xts, 256 otherwise)")
    f.add_argument("--hash", dest="hash_spec", default="sha256", help="PBKDF2 and AF hash (default sha256)")
    f.add_argument("--uuid", default=None, help="volume UUID (default: random)")
    f.add_argument("--header", default=None, metavar="HDR", help="write a detached header to HDR")
    f.add_argument("--align-payload", type=int, default=None, metavar="SECTORS",
                   help="payload alignment in 512-byte sectors (default 2048 = 1 MiB); with --header the offset")
    f.add_argument("--key-slot", "-S", type=int, default=0, metavar="N", help="slot for the first key (default 0)")
    _pbkdf_arguments(f)
    add_unlock_arguments(f, None)
    add_new_secret_arguments(f)
    f.add_argument("-q", "--batch-mode", "--quiet", dest="quiet", action="store_true",
                   help="batch mode: overwrite an existing LUKS header without refusing, print nothing")
    f.set_defaults(func=run_format)

    d = _volume_command(acts, "dump", "show the header (luksDump)")
    d.add_argument("--dump-volume-key", "--dump-master-key", action="store_true",
                   help="print the volume key (needs a secret; handle the output with care)")
    d.add_argument("--output", choices=["human", "json"], default="human")
    add_unlock_arguments(d, "unlock with key slot N only")
    d.set_defaults(func=run_dump)

    a = _volume_command(acts, "add-key", "add a passphrase or key file to a free slot (luksAddKey)")
    add_unlock_arguments(a, "put the new key in slot N (default: the first free slot)")
    add_new_secret_arguments(a)
    _pbkdf_arguments(a)
    a.set_defaults(func=run_add_key)

    r = _volume_command(acts, "remove-key", "remove the key slot the given secret opens (luksRemoveKey)")
    r.add_argument("--force", action="store_true", help="allow removing the last active key slot")
    add_unlock_arguments(r, "look in key slot N only")
    r.set_defaults(func=run_remove_key)

    k = _volume_command(acts, "kill-slot", "wipe key slot N (luksKillSlot)")
    k.add_argument("slot", type=int)
    k.add_argument("--force", action="store_true",
                   help="no secret needed; also allows killing the last active key slot")
    add_unlock_arguments(k, None)
    k.set_defaults(func=run_kill_slot)

    c = _volume_command(acts, "change-key", "replace a passphrase or key file (luksChangeKey)")
    add_unlock_arguments(c, "change the key of slot N only")
    add_new_secret_arguments(c)
    _pbkdf_arguments(c)
    c.set_defaults(func=run_change_key)

    b = _volume_command(acts, "header-backup", "save the header and key slots to a file (luksHeaderBackup)")
    b.add_argument("--header-backup-file", required=True, metavar="FILE", help="the backup file (must not exist)")
    b.set_defaults(func=run_header_backup)

    h = _volume_command(acts, "header-restore", "write a header backup back (luksHeaderRestore)")
    h.add_argument("--header-backup-file", required=True, metavar="FILE", help="the backup file")
    h.set_defaults(func=run_header_restore)

    u = _volume_command(acts, "uuid", "print the UUID, or set it with --uuid (luksUUID)")
    u.add_argument("--uuid", default=None, help="set this UUID")
    u.add_argument("--new-uuid", action="store_true", help="set a new random UUID")
    u.set_defaults(func=run_uuid)


# -- actions ------------------------------------------------------------------------------


def _header_device(args, writable: bool) -> BlockDevice:
    return FileDevice(args.header or args.device, writable=writable)


def _pbkdf(args) -> dict[str, Any]:
    return {"iterations": args.pbkdf_force_iterations, "iter_time_ms": args.iter_time}


def run_format(args) -> int:
    from ..luks1 import luks_format
    from ..luks1.create import layout

    secret = _new_secret(args, fallback_to_unlock=True)
    volume_key = _read_file(args.volume_key_file) if args.volume_key_file else None
    detached = args.header is not None
    p = layout(args.cipher, args.key_size, args.hash_spec, args.align_payload, detached)
    target = args.header if detached else args.device
    if not args.quiet and os.path.exists(target):
        with open(target, "rb") as fh:
            if fh.read(6) == b"LUKS\xba\xbe":
                raise InvalidArgumentError(f"{target} already holds a LUKS header: give -q (--batch-mode) to "
                                           "overwrite it (its data becomes unreadable)")
    if args.size is not None:
        size = parse_size(args.size)
        if size % 512:
            raise InvalidArgumentError(f"--size {args.size} is not a multiple of 512 bytes")
        total = size + p.payload_offset * 512
        FileDevice.create(args.device, total).close()
    elif not os.path.exists(args.device):
        raise InvalidArgumentError(f"{args.device}: no such file (give --size to create it)")
    if detached:
        if not os.path.exists(args.header):
            FileDevice.create(args.header, p.keyslots_end).close()
        elif os.path.isfile(args.header) and os.path.getsize(args.header) < p.keyslots_end:
            os.truncate(args.header, p.keyslots_end)
        hdr_dev = FileDevice(args.header, writable=True)
        data_size = os.path.getsize(args.device) if os.path.isfile(args.device) else None
    else:
        hdr_dev = FileDevice(args.device, writable=True)
        data_size = None
    with hdr_dev:
        hdr, vk = luks_format(hdr_dev, secret, cipher=args.cipher, key_bits=args.key_size, hash_spec=args.hash_spec,
                              uuid=args.uuid, volume_key=volume_key, key_slot=args.key_slot,
                              align_payload=args.align_payload, detached=detached, data_device_size=data_size,
                              **_pbkdf(args))
        del vk
    if not args.quiet:
        print(f"Formatted {args.device}: LUKS1 {hdr.cipher_spec}, {hdr.key_bytes * 8}-bit key, "
              f"payload at sector {hdr.payload_offset}, UUID {hdr.uuid}")
    return 0


def _hexlines(data: bytes, per_line: int = 16) -> list[str]:
    return [" ".join(f"{b:02x}" for b in data[i : i + per_line]) + " " for i in range(0, len(data), per_line)]


def format_dump(hdr, name: str) -> str:
    """The header as cryptsetup luksDump prints it (LUKS1)."""
    out = [f"LUKS header information for {name}", "", f"Version:       \t{hdr.version}",
           f"Cipher name:   \t{hdr.cipher_name}", f"Cipher mode:   \t{hdr.cipher_mode}",
           f"Hash spec:     \t{hdr.hash_spec}", f"Payload offset:\t{hdr.payload_offset}",
           f"MK bits:       \t{hdr.key_bytes * 8}"]
    out.append(f"MK digest:     \t{_hexlines(hdr.mk_digest, 20)[0]}")
    salt = _hexlines(hdr.mk_digest_salt)
    out.append(f"MK salt:       \t{salt[0]}")
    out += [f"               \t{line}" for line in salt[1:]]
    out.append(f"MK iterations: \t{hdr.mk_digest_iter}")
    out.append(f"UUID:          \t{hdr.uuid}")
    out.append("")
    for s in hdr.key_slots:
        if not s.active:
            out.append(f"Key Slot {s.index}: DISABLED")
            continue
        out.append(f"Key Slot {s.index}: ENABLED")
        out.append(f"\tIterations:         \t{s.iterations}")
        ssalt = _hexlines(s.salt)
        out.append(f"\tSalt:               \t{ssalt[0]}")
        out += [f"\t                      \t{line}" for line in ssalt[1:]]
        out.append(f"\tKey material offset:\t{s.key_material_offset}")
        out.append(f"\tAF stripes:            \t{s.stripes}")
    return "\n".join(out) + "\n"


def header_json(hdr) -> dict[str, Any]:
    return {
        "version": hdr.version,
        "cipher-name": hdr.cipher_name,
        "cipher-mode": hdr.cipher_mode,
        "hash-spec": hdr.hash_spec,
        "payload-offset": hdr.payload_offset,
        "mk-bits": hdr.key_bytes * 8,
        "mk-digest": hdr.mk_digest.hex(),
        "mk-salt": hdr.mk_digest_salt.hex(),
        "mk-iterations": hdr.mk_digest_iter,
        "uuid": hdr.uuid,
        "key-slots": [
            {"slot": s.index, "enabled": s.active, "iterations": s.iterations, "salt": s.salt.hex(),
             "key-material-offset": s.key_material_offset, "stripes": s.stripes}
            for s in hdr.key_slots
        ],
    }


def run_dump(args) -> int:
    from ..luks1 import read_header, unlock

    with _header_device(args, False) as dev:
        hdr = read_header(dev)
        if not args.dump_volume_key:
            if args.output == "json":
                json.dump(header_json(hdr), sys.stdout, indent=4)
                sys.stdout.write("\n")
            else:
                sys.stdout.write(format_dump(hdr, args.device))
            return 0
        secrets = _unlock_secrets(args, prompt=f"Enter passphrase for {args.device}: ")
        _, vk = unlock(dev, key_slot=args.key_slot, **secrets)
    if args.output == "json":
        doc = header_json(hdr)
        doc["volume-key"] = vk.hex()
        json.dump(doc, sys.stdout, indent=4)
        sys.stdout.write("\n")
        return 0
    lines = [f"LUKS header information for {args.device}", f"Cipher name:   \t{hdr.cipher_name}",
             f"Cipher mode:   \t{hdr.cipher_mode}", f"Payload offset:\t{hdr.payload_offset}",
             f"UUID:          \t{hdr.uuid}", f"MK bits:       \t{hdr.key_bytes * 8}"]
    key_lines = _hexlines(vk)
    lines.append(f"MK dump:\t{key_lines[0]}")
    lines += [f"\t\t{line}" for line in key_lines[1:]]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def run_add_key(args) -> int:
    from ..luks1 import add_key

    secrets = _unlock_secrets(args, prompt=f"Enter any existing passphrase for {args.device}: ")
    new = _new_secret(args)
    with _header_device(args, True) as dev:
        slot = add_key(dev, new, new_slot=args.key_slot, **secrets, **_pbkdf(args))
    print(f"Key slot {slot} created.")
    return 0


def run_remove_key(args) -> int:
    from ..luks1 import remove_key

    secrets = _unlock_secrets(args, prompt=f"Enter passphrase to be deleted from {args.device}: ")
    if "volume_key" in secrets:
        raise InvalidArgumentError("remove-key needs the passphrase or key file of the slot, not the volume key")
    with _header_device(args, True) as dev:
        slot = remove_key(dev, key_slot=args.key_slot, force_last=args.force, **secrets)
    print(f"Key slot {slot} removed.")
    return 0


def run_kill_slot(args) -> int:
    from ..luks1 import kill_slot

    secrets = {} if args.force else _unlock_secrets(args, prompt=f"Enter any remaining passphrase for {args.device}: ")
    with _header_device(args, True) as dev:
        kill_slot(dev, args.slot, force=args.force, **secrets)
    print(f"Key slot {args.slot} removed.")
    return 0


def run_change_key(args) -> int:
    from ..luks1 import change_key

    secrets = _unlock_secrets(args, prompt=f"Enter passphrase to be changed for {args.device}: ")
    if "volume_key" in secrets:
        raise InvalidArgumentError("change-key needs the current passphrase or key file, not the volume key")
    new = _new_secret(args)
    with _header_device(args, True) as dev:
        old, slot = change_key(dev, new, key_slot=args.key_slot, **secrets, **_pbkdf(args))
    print(f"Key slot {old} changed." if old == slot else f"Key slot {old} replaced by key slot {slot}.")
    return 0


def run_header_backup(args) -> int:
    from ..luks1 import header_backup

    if os.path.exists(args.header_backup_file):
        raise InvalidArgumentError(f"{args.header_backup_file} already exists")
    with _header_device(args, False) as dev:
        data = header_backup(dev)
    fd = os.open(args.header_backup_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return 0


def run_header_restore(args) -> int:
    from ..luks1 import header_restore

    backup = _read_file(args.header_backup_file)
    with _header_device(args, True) as dev:
        header_restore(dev, backup)
    return 0


def run_uuid(args) -> int:
    from ..luks1 import read_header, set_uuid

    if args.uuid or args.new_uuid:
        with _header_device(args, True) as dev:
            print(set_uuid(dev, args.uuid))
        return 0
    with _header_device(args, False) as dev:
        print(read_header(dev).uuid)
    return 0
