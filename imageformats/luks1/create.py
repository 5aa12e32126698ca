"""luksFormat and key management (add, remove, kill, change), header backup/restore, UUID.

LUKS1 spec 1.2.3, "Initialization" (layout, master-key digest) and "Key setting" / "Key
revocation".  Crash safety: every change touches one key slot at a time and is ordered so
that a crash at any point leaves every other slot as it was:

* adding a key writes the key material into a disabled slot's area first (flush), then the
  slot's parameters while it is still disabled (flush), then flips it to enabled (flush);
* removing a key disables the slot (flush) before its material is wiped;
* changing a key adds the new slot before the old one is removed.

The header is 592 bytes (two sectors); a torn write can only affect the slot being changed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ..block import BlockDevice, FileDevice, copy
from ..errors import InvalidArgumentError, WrongPassphraseError
from .header import (
    DEFAULT_ALIGN_SECTORS,
    HEADER_SIZE,
    KEYSLOT_ALIGN,
    MIN_ITERATIONS,
    NUM_KEYS,
    SALT_SIZE,
    SECTOR_SIZE,
    STRIPES,
    KeySlot,
    LuksHeader,
    af_sectors,
    check_uuid,
    luks_version,
    new_uuid,
)
from .keyslots import (
    MAX_ITERATIONS,
    encrypt_material,
    mk_digest,
    pbkdf2,
    read_header,
    unlock_detailed,
)
from .sectors import check_key_size, hash_constructor, parse_cipher

DEFAULT_CIPHER = "aes-xts-plain64"
DEFAULT_HASH = "sha256"
DEFAULT_ITER_TIME_MS = 2000
#: cryptsetup's LUKS_MKD_ITERATIONS_MS: the master-key digest gets 1/8 of a 1 s budget.
MK_DIGEST_ITER_TIME_MS = 125


def split_cipher_spec(spec: str) -> tuple[str, str]:
    """``aes-xts-plain64`` -> (``aes``, ``xts-plain64``); ``aes-ecb`` -> (``aes``, ``ecb``)."""
    name, sep, mode = spec.partition("-")
    if not sep or not name or not mode:
        raise InvalidArgumentError(f"cipher {spec!r} is not CIPHER-MODE (e.g. aes-xts-plain64, aes-cbc-essiv:sha256)")
    return name, mode


def default_key_bits(cipher_mode: str) -> int:
    """cryptsetup's defaults: 512 bits for XTS (two AES-256 keys), 256 otherwise."""
    return 512 if cipher_mode.lower().startswith("xts") else 256


# -- PBKDF2 benchmark (what cryptsetup does to turn --iter-time into iterations) ----------


def benchmark_iterations(hash_spec: str, key_bytes: int, iter_time_ms: float) -> int:
    """PBKDF2 iterations that take about ``iter_time_ms`` on this machine (at least 1000)."""
    iterations = 1000
    while True:
        start = time.perf_counter()
        pbkdf2(hash_spec, b"benchmark", b"\0" * SALT_SIZE, iterations, key_bytes)
        elapsed = time.perf_counter() - start
        if elapsed >= 0.05 or iterations >= MAX_ITERATIONS // 4:
            break
        iterations *= 4 if elapsed < 0.01 else 2
    per_ms = iterations / max(elapsed * 1000.0, 1e-6)
    return max(MIN_ITERATIONS, min(MAX_ITERATIONS, int(per_ms * iter_time_ms)))


def _slot_iterations(hdr: LuksHeader, iterations: int | None, iter_time_ms: float | None) -> int:
    if iterations is not None:
        if iterations < MIN_ITERATIONS:
            raise InvalidArgumentError(f"PBKDF2 iterations must be at least {MIN_ITERATIONS} (got {iterations})")
        if iterations > MAX_ITERATIONS:
            raise InvalidArgumentError(f"PBKDF2 iterations must be at most {MAX_ITERATIONS} (got {iterations})")
        return iterations
    ms = DEFAULT_ITER_TIME_MS if iter_time_ms is None else iter_time_ms
    if ms <= 0:
        raise InvalidArgumentError(f"iteration time must be positive (got {ms} ms)")
    return benchmark_iterations(hdr.hash_spec, hdr.key_bytes, ms)


# -- low-level writes ------------------------------------------------------------------


def _write_header(dev: BlockDevice, hdr: LuksHeader) -> None:
    dev.pwrite(hdr.to_bytes(), 0)
    dev.flush()


def _install_slot(dev: BlockDevice, hdr: LuksHeader, index: int, volume_key: bytes, secret: bytes,
                  iterations: int) -> LuksHeader:
    """Store ``secret`` for ``volume_key`` in the disabled slot ``index``; return the new header."""
    slot = hdr.key_slots[index]
    if slot.active:
        raise InvalidArgumentError(f"LUKS key slot {index} is already in use")
    salt = os.urandom(SALT_SIZE)
    material = encrypt_material(hdr, volume_key, secret, salt, iterations, slot.stripes)
    # 1. key material into the unused area (the slot is disabled: nothing refers to it yet)
    dev.pwrite(material, slot.key_material_offset * SECTOR_SIZE)
    dev.flush()
    # 2. the slot's parameters, still disabled
    new = hdr.copy()
    s = new.key_slots[index]
    s.iterations, s.salt = iterations, salt
    _write_header(dev, new)
    # 3. enable it: only the slot's 4-byte state changes, inside one sector
    s.active = True
    _write_header(dev, new)
    return new


def _revoke_slot(dev: BlockDevice, hdr: LuksHeader, index: int) -> LuksHeader:
    """Disable slot ``index`` (flush), clear its parameters, then overwrite its key material."""
    new = hdr.copy()
    s = new.key_slots[index]
    s.active = False
    _write_header(dev, new)
    s.iterations, s.salt = 0, bytes(SALT_SIZE)
    _write_header(dev, new)
    length = af_sectors(new.key_bytes, s.stripes) * SECTOR_SIZE
    dev.pwrite(os.urandom(length), s.key_material_offset * SECTOR_SIZE)
    dev.flush()
    return new


def _free_slot(hdr: LuksHeader, wanted: int | None) -> int:
    if wanted is not None:
        if not 0 <= wanted < NUM_KEYS:
            raise InvalidArgumentError(f"key slot {wanted} is out of range (0-{NUM_KEYS - 1})")
        if hdr.key_slots[wanted].active:
            raise InvalidArgumentError(f"LUKS key slot {wanted} is already in use")
        return wanted
    for s in hdr.key_slots:
        if not s.active:
            return s.index
    raise InvalidArgumentError("all 8 LUKS key slots are in use: remove a key first")


# -- luksFormat ------------------------------------------------------------------------


@dataclass
class FormatParams:
    cipher_name: str
    cipher_mode: str
    key_bytes: int
    hash_spec: str
    payload_offset: int  # sectors
    keyslots_end: int  # bytes


def layout(cipher: str = DEFAULT_CIPHER, key_bits: int | None = None, hash_spec: str = DEFAULT_HASH,
           align_payload: int | None = None, detached: bool = False) -> FormatParams:
    """cryptsetup's LUKS1 layout: slot areas 4 KiB aligned from 4 KiB, payload aligned to 1 MiB.

    ``align_payload`` (sectors) overrides the payload alignment; with a detached header it is
    the payload offset itself (default 0).
    """
    name, mode = split_cipher_spec(cipher)
    parse_cipher(name, mode)
    bits = default_key_bits(mode) if key_bits is None else key_bits
    if bits <= 0 or bits % 8:
        raise InvalidArgumentError(f"key size {bits} is not a positive whole number of bytes in bits")
    key_bytes = bits // 8
    check_key_size(name, mode, key_bytes)
    hash_constructor(hash_spec)
    align_secs = KEYSLOT_ALIGN // SECTOR_SIZE
    stride = -(-af_sectors(key_bytes) // align_secs) * align_secs
    end = align_secs + NUM_KEYS * stride
    if detached:
        payload = 0 if align_payload is None else align_payload
    else:
        align = DEFAULT_ALIGN_SECTORS if align_payload is None else align_payload
        if align <= 0:
            raise InvalidArgumentError(f"payload alignment must be positive (got {align} sectors)")
        payload = -(-end // align) * align
    if payload < 0 or payload >= 1 << 32:
        raise InvalidArgumentError(f"payload offset {payload} sectors is out of range")
    return FormatParams(name, mode, key_bytes, hash_spec, payload, end * SECTOR_SIZE)


def luks_format(header_dev: BlockDevice, secret: bytes, *, cipher: str = DEFAULT_CIPHER,
                key_bits: int | None = None, hash_spec: str = DEFAULT_HASH, iter_time_ms: float | None = None,
                iterations: int | None = None, uuid: str | None = None, volume_key: bytes | None = None,
                key_slot: int = 0, align_payload: int | None = None, detached: bool = False,
                data_device_size: int | None = None) -> tuple[LuksHeader, bytes]:
    """Write a new LUKS1 header with ``secret`` in ``key_slot``; return (header, volume key).

    ``header_dev`` receives the header and key slots (the whole volume unless ``detached``).
    Iterations come from a PBKDF2 benchmark (``iter_time_ms``, default 2000) unless
    ``iterations`` forces them (minimum 1000; the master-key digest then uses 1000).
    """
    if secret is None:
        raise InvalidArgumentError("a passphrase or key file for the new volume is required")
    p = layout(cipher, key_bits, hash_spec, align_payload, detached)
    if volume_key is None:
        volume_key = os.urandom(p.key_bytes)
    elif len(volume_key) != p.key_bytes:
        raise InvalidArgumentError(f"the volume key has {len(volume_key) * 8} bits, expected {p.key_bytes * 8}")
    if not 0 <= key_slot < NUM_KEYS:
        raise InvalidArgumentError(f"key slot {key_slot} is out of range (0-{NUM_KEYS - 1})")
    need = p.keyslots_end if detached else max(p.keyslots_end, p.payload_offset * SECTOR_SIZE)
    if header_dev.size < need:
        raise InvalidArgumentError(
            f"the device is too small for a LUKS1 header: {header_dev.size} bytes, at least {need} needed"
        )
    if detached and data_device_size is not None and data_device_size < p.payload_offset * SECTOR_SIZE:
        raise InvalidArgumentError("the data device is smaller than the payload offset")
    align_secs = KEYSLOT_ALIGN // SECTOR_SIZE
    stride = -(-af_sectors(p.key_bytes) // align_secs) * align_secs
    hdr = LuksHeader(
        cipher_name=p.cipher_name,
        cipher_mode=p.cipher_mode,
        hash_spec=p.hash_spec,
        payload_offset=p.payload_offset,
        key_bytes=p.key_bytes,
        mk_digest=b"",
        mk_digest_salt=os.urandom(SALT_SIZE),
        mk_digest_iter=MIN_ITERATIONS,
        uuid=check_uuid(uuid) if uuid else new_uuid(),
        key_slots=[KeySlot(i, False, 0, bytes(SALT_SIZE), align_secs + i * stride, STRIPES) for i in range(NUM_KEYS)],
    )
    slot_iter = _slot_iterations(hdr, iterations, iter_time_ms)
    if iterations is None:
        ms = DEFAULT_ITER_TIME_MS if iter_time_ms is None else iter_time_ms
        hdr.mk_digest_iter = max(MIN_ITERATIONS, int(slot_iter * MK_DIGEST_ITER_TIME_MS / ms))
    hdr.mk_digest = mk_digest(hdr, volume_key)
    hdr.validate(header_device_size=header_dev.size)
    # Wipe the header sectors; fill the key-slot areas with random bytes (no old key material survives).
    header_dev.pwrite(bytes(align_secs * SECTOR_SIZE), 0)
    header_dev.pwrite(os.urandom(p.keyslots_end - align_secs * SECTOR_SIZE), align_secs * SECTOR_SIZE)
    header_dev.flush()
    _write_header(header_dev, hdr)
    hdr = _install_slot(header_dev, hdr, key_slot, volume_key, bytes(secret), slot_iter)
    return hdr, volume_key


# -- key management --------------------------------------------------------------------


def add_key(header_dev: BlockDevice, new_secret: bytes, *, passphrase=None, key_file=None, volume_key=None,
            unlock_slot: int | None = None, new_slot: int | None = None, iterations: int | None = None,
            iter_time_ms: float | None = None) -> int:
    """luksAddKey: store ``new_secret`` in a free slot (or ``new_slot``); return the slot number."""
    hdr, vk, _ = unlock_detailed(header_dev, passphrase=passphrase, key_file=key_file,
                                 volume_key=volume_key, key_slot=unlock_slot)
    index = _free_slot(hdr, new_slot)
    _install_slot(header_dev, hdr, index, vk, bytes(new_secret), _slot_iterations(hdr, iterations, iter_time_ms))
    return index


def remove_key(header_dev: BlockDevice, *, passphrase=None, key_file=None, key_slot: int | None = None,
               force_last: bool = False) -> int:
    """luksRemoveKey: revoke the slot the given secret opens; return its number."""
    if passphrase is None and key_file is None:
        raise InvalidArgumentError("remove-key needs the passphrase or key file of the slot to remove")
    hdr, _, index = unlock_detailed(header_dev, passphrase=passphrase, key_file=key_file, key_slot=key_slot)
    assert index is not None
    if hdr.active_slots() == [index] and not force_last:
        raise InvalidArgumentError(
            f"key slot {index} is the last active key slot: removing it makes the volume unusable (use --force)"
        )
    _revoke_slot(header_dev, hdr, index)
    return index


def kill_slot(header_dev: BlockDevice, index: int, *, passphrase=None, key_file=None, volume_key=None,
              force: bool = False) -> None:
    """luksKillSlot: revoke slot ``index``.

    Unless ``force``, a secret that opens another slot (or the volume key) must be given,
    and the last active slot is never killed.
    """
    hdr = read_header(header_dev)
    if not 0 <= index < NUM_KEYS:
        raise InvalidArgumentError(f"key slot {index} is out of range (0-{NUM_KEYS - 1})")
    if not hdr.key_slots[index].active:
        raise InvalidArgumentError(f"LUKS key slot {index} is not active")
    others = [i for i in hdr.active_slots() if i != index]
    if not force:
        if not others:
            raise InvalidArgumentError(
                f"key slot {index} is the last active key slot: killing it makes the volume unusable (use --force)"
            )
        if volume_key is not None:
            unlock_detailed(header_dev, volume_key=volume_key, header=hdr)
        elif passphrase is not None or key_file is not None:
            for other in others:
                try:
                    unlock_detailed(header_dev, passphrase=passphrase, key_file=key_file, key_slot=other, header=hdr)
                    break
                except WrongPassphraseError:
                    continue
            else:
                raise WrongPassphraseError("the given secret opens no remaining key slot")
        else:
            raise InvalidArgumentError(
                "kill-slot needs the passphrase of a remaining key slot (or --force to skip the check)"
            )
    _revoke_slot(header_dev, hdr, index)


def change_key(header_dev: BlockDevice, new_secret: bytes, *, passphrase=None, key_file=None,
               key_slot: int | None = None, iterations: int | None = None,
               iter_time_ms: float | None = None) -> tuple[int, int]:
    """luksChangeKey: replace the secret of the slot the old secret opens; return (old, new) slot.

    The new slot is written before the old one is revoked.  Only when all 8 slots are in use is
    the slot rewritten in place (the 7 other slots stay usable throughout).
    """
    if passphrase is None and key_file is None:
        raise InvalidArgumentError("change-key needs the current passphrase or key file")
    hdr, vk, old = unlock_detailed(header_dev, passphrase=passphrase, key_file=key_file, key_slot=key_slot)
    assert old is not None
    iters = _slot_iterations(hdr, iterations, iter_time_ms)
    free = [s.index for s in hdr.key_slots if not s.active]
    if free:
        hdr = _install_slot(header_dev, hdr, free[0], vk, bytes(new_secret), iters)
        _revoke_slot(header_dev, hdr, old)
        return old, free[0]
    hdr = _revoke_slot(header_dev, hdr, old)
    _install_slot(header_dev, hdr, old, vk, bytes(new_secret), iters)
    return old, old


def header_area_size(hdr: LuksHeader) -> int:
    """Bytes a header backup holds: the header and key-slot areas, rounded up to 4 KiB (as cryptsetup)."""
    return -(-hdr.keyslots_end() // KEYSLOT_ALIGN) * KEYSLOT_ALIGN


def header_backup(header_dev: BlockDevice) -> bytes:
    """luksHeaderBackup: the header and key-slot area as bytes."""
    hdr = read_header(header_dev)
    size = min(header_area_size(hdr), header_dev.size)
    return header_dev.pread(size, 0)


def header_restore(header_dev: BlockDevice, backup: bytes) -> LuksHeader:
    """luksHeaderRestore: write a backup made by :func:`header_backup` (or cryptsetup) back.

    Refused when the device holds a LUKS1 header with a different payload offset or key size
    (the data would no longer decrypt), or when the device is too small.
    """
    if luks_version(backup[:8]) is None:
        raise InvalidArgumentError("the backup file is not a LUKS header backup")
    new = LuksHeader.from_bytes(backup)
    try:
        new.validate(header_device_size=len(backup))
    except Exception as exc:
        raise InvalidArgumentError(f"the backup file is not a usable LUKS header backup: {exc}") from None
    if len(backup) > header_dev.size:
        raise InvalidArgumentError(
            f"the device ({header_dev.size} bytes) is smaller than the header backup ({len(backup)} bytes)"
        )
    head = header_dev.pread(min(HEADER_SIZE, header_dev.size), 0)
    if luks_version(head) == 1 and len(head) == HEADER_SIZE:
        try:
            cur = LuksHeader.from_bytes(head)
        except Exception:
            cur = None
        if cur is not None and (cur.payload_offset != new.payload_offset or cur.key_bytes != new.key_bytes):
            raise InvalidArgumentError(
                "the payload offset or key size on the device differs from the backup's: restore refused"
            )
    # Key material first, the header (which refers to it) last.
    header_dev.pwrite(backup[HEADER_SIZE:], HEADER_SIZE)
    header_dev.flush()
    header_dev.pwrite(backup[:HEADER_SIZE], 0)
    header_dev.flush()
    return new


def set_uuid(header_dev: BlockDevice, uuid: str | None = None) -> str:
    """luksUUID --uuid: set (or, with None, regenerate) the volume UUID; return it."""
    hdr = read_header(header_dev)
    hdr.uuid = check_uuid(uuid) if uuid else new_uuid()
    _write_header(header_dev, hdr)
    return hdr.uuid


# -- convert -O luks -------------------------------------------------------------------

_OUTPUT_OPTIONS = {"cipher", "key_size", "hash", "iter_time", "iterations", "pbkdf_force_iterations", "uuid",
                   "align_payload", "new_passphrase", "new_key_file"}


def write_luks(src: BlockDevice, dst_path: str, options: dict[str, Any], progress=None) -> None:
    """``convert -O luks``: encrypt ``src``'s guest view into a new LUKS1 volume at ``dst_path``.

    Options (``-o``): cipher=aes-xts-plain64, key-size=BITS, hash=sha256, iter-time=MS,
    iterations=N (alias pbkdf-force-iterations), uuid=U, align-payload=SECTORS.  The
    passphrase comes from ``convert --new-passphrase-file`` / ``--new-key-file`` (options
    ``new_passphrase`` / ``new_key_file``), never from ``-o``.  A source whose size is not a
    multiple of 512 is padded with zeroes to the next sector.
    """
    unknown = set(options) - _OUTPUT_OPTIONS
    for name in ("new_passphrase", "new_key_file"):
        if isinstance(options.get(name), str):  # came from -o on the command line: never accept a secret there
            unknown.add(name)
    if unknown:
        raise InvalidArgumentError(
            f"unknown luks output option(s) {', '.join(sorted(unknown))} "
            f"(known: cipher, key-size, hash, iter-time, iterations, uuid, align-payload)"
        )
    secret = options.get("new_passphrase")
    if secret is None:
        secret = options.get("new_key_file")
    if secret is None:
        raise InvalidArgumentError("convert -O luks needs --new-passphrase-file FILE or --new-key-file FILE")

    def num(name: str) -> int | None:
        value = options.get(name)
        if value is None:
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"luks output option {name.replace('_', '-')}={value!r} is not a number") from None

    iterations = num("iterations")
    if iterations is None:
        iterations = num("pbkdf_force_iterations")
    p = layout(options.get("cipher", DEFAULT_CIPHER), num("key_size"), options.get("hash", DEFAULT_HASH),
               num("align_payload"))
    payload_size = -(-src.size // SECTOR_SIZE) * SECTOR_SIZE
    dst = FileDevice.create(dst_path, p.payload_offset * SECTOR_SIZE + payload_size)
    try:
        iter_time = num("iter_time")
        _, vk = luks_format(dst, secret, cipher=options.get("cipher", DEFAULT_CIPHER), key_bits=num("key_size"),
                            hash_spec=options.get("hash", DEFAULT_HASH), iter_time_ms=iter_time,
                            iterations=iterations, uuid=options.get("uuid"), align_payload=num("align_payload"))
    except BaseException:
        dst.close()
        raise
    from .device import LuksDevice

    with LuksDevice(dst, writable=True, volume_key=vk) as dev:
        del vk
        copy(src, dev, progress)
        if payload_size > src.size:
            dev.zero(payload_size - src.size, src.size)
        dev.flush()


__all__ = [
    "luks_format", "layout", "add_key", "remove_key", "kill_slot", "change_key", "header_backup",
    "header_restore", "header_area_size", "set_uuid", "write_luks", "benchmark_iterations", "split_cipher_spec",
    "DEFAULT_CIPHER", "DEFAULT_HASH", "DEFAULT_ITER_TIME_MS",
]
