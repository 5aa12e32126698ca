"""Key slots: PBKDF2, the anti-forensic splitter, the master-key digest, and unlocking.

LUKS1 spec 1.2.3: "Master key recovery" (PBKDF2 of the passphrase decrypts the slot's key
material, AF-merge gives the volume key, its PBKDF2 digest must equal mk-digest) and
"AF-Splitter" (H1 diffusion: hash each digest-sized block with its big-endian index).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from ..block import BlockDevice
from ..errors import (
    CorruptImageError,
    InvalidArgumentError,
    SecretRequiredError,
    UnsupportedFeatureError,
    WrongPassphraseError,
)
from .header import (
    DIGEST_SIZE,
    HEADER_SIZE,
    NUM_KEYS,
    SECTOR_SIZE,
    KeySlot,
    LuksHeader,
    af_sectors,
    luks_version,
)
from .sectors import SectorCipher, check_key_size, hash_constructor

#: PBKDF2 iteration counts above this are treated as a hostile header (hours of CPU otherwise).
MAX_ITERATIONS = 100_000_000


def pbkdf2(hash_spec: str, password: bytes, salt: bytes, iterations: int, dklen: int) -> bytes:
    """PBKDF2-HMAC with a LUKS hash spec (OpenSSL via hashlib)."""
    h = hash_constructor(hash_spec)
    if iterations > MAX_ITERATIONS:
        raise CorruptImageError(f"implausible PBKDF2 iteration count {iterations} (limit {MAX_ITERATIONS})")
    try:
        return hashlib.pbkdf2_hmac(h.hashlib_name, bytes(password), salt, iterations, dklen)
    except ValueError:
        raise UnsupportedFeatureError(f"PBKDF2 with hash {hash_spec!r} is not available on this platform") from None


def _diffuse(block: bytes, h, digest_size: int) -> bytes:
    # LUKS1 spec 1.2.3, "AF-Splitter", H1: hash(be32(i) || block_i), the last block truncated.
    out = bytearray()
    for i, pos in enumerate(range(0, len(block), digest_size)):
        piece = block[pos : pos + digest_size]
        out += h(i.to_bytes(4, "big") + piece).digest()[: len(piece)]
    return bytes(out)


def af_merge(material: bytes, key_bytes: int, stripes: int, hash_spec: str) -> bytes:
    """AFmerge: the key from ``stripes`` * ``key_bytes`` bytes of split material."""
    h = hash_constructor(hash_spec)
    ds = h.digest_size
    d = 0
    kb = key_bytes
    mv = memoryview(material)
    for i in range(stripes - 1):
        d ^= int.from_bytes(mv[i * kb : (i + 1) * kb], "big")
        d = int.from_bytes(_diffuse(d.to_bytes(kb, "big"), h, ds), "big")
    last = int.from_bytes(mv[(stripes - 1) * kb : stripes * kb], "big")
    return (d ^ last).to_bytes(kb, "big")


def af_split(key: bytes, stripes: int, hash_spec: str) -> bytes:
    """AFsplit: ``stripes`` - 1 random stripes, the last chosen so that AFmerge gives ``key``."""
    h = hash_constructor(hash_spec)
    ds = h.digest_size
    kb = len(key)
    rand = os.urandom(kb * (stripes - 1))
    d = 0
    for i in range(stripes - 1):
        d ^= int.from_bytes(rand[i * kb : (i + 1) * kb], "big")
        d = int.from_bytes(_diffuse(d.to_bytes(kb, "big"), h, ds), "big")
    last = (d ^ int.from_bytes(key, "big")).to_bytes(kb, "big")
    return rand + last


def mk_digest(hdr: LuksHeader, volume_key: bytes) -> bytes:
    """PBKDF2(volume key, mk-digest-salt, mk-digest-iter), 20 bytes (spec: "Master key digest")."""
    return pbkdf2(hdr.hash_spec, volume_key, hdr.mk_digest_salt, hdr.mk_digest_iter, DIGEST_SIZE)


def volume_key_matches(hdr: LuksHeader, volume_key: bytes) -> bool:
    return len(volume_key) == hdr.key_bytes and hmac.compare_digest(mk_digest(hdr, volume_key), hdr.mk_digest)


def read_header(header_dev: BlockDevice) -> LuksHeader:
    """Read, parse and check the header at the start of ``header_dev`` (key material must fit in it)."""
    size = header_dev.size
    head = header_dev.pread(min(size, HEADER_SIZE), 0)
    version = luks_version(head)
    if version is None:
        raise CorruptImageError("not a LUKS device (bad magic)")
    hdr = LuksHeader.from_bytes(head)
    hdr.validate(header_device_size=size)
    hash_constructor(hdr.hash_spec)  # UnsupportedFeatureError names a hash OpenSSL lacks
    check_key_size(hdr.cipher_name, hdr.cipher_mode, hdr.key_bytes)
    if hdr.mk_digest_iter > MAX_ITERATIONS:
        raise CorruptImageError(f"implausible master-key digest iteration count {hdr.mk_digest_iter}")
    return hdr


def material_length(hdr: LuksHeader, slot: KeySlot) -> int:
    return af_sectors(hdr.key_bytes, slot.stripes) * SECTOR_SIZE


def encrypt_material(hdr: LuksHeader, volume_key: bytes, secret: bytes, salt: bytes, iterations: int,
                     stripes: int) -> bytearray:
    """The encrypted key material of a slot: AFsplit(volume key) encrypted with PBKDF2(secret)."""
    split = af_split(volume_key, stripes, hdr.hash_spec)
    buf = bytearray(af_sectors(hdr.key_bytes, stripes) * SECTOR_SIZE)
    buf[: len(split)] = split
    derived = pbkdf2(hdr.hash_spec, secret, salt, iterations, hdr.key_bytes)
    SectorCipher(hdr.cipher_name, hdr.cipher_mode, derived).encrypt_into(buf, 0)
    return buf


def try_slot(hdr: LuksHeader, slot: KeySlot, material: bytes, secret: bytes) -> bytes | None:
    """The volume key if ``secret`` opens ``slot`` (``material`` = its encrypted key material), else None."""
    derived = pbkdf2(hdr.hash_spec, secret, slot.salt, slot.iterations, hdr.key_bytes)
    buf = bytearray(material)
    SectorCipher(hdr.cipher_name, hdr.cipher_mode, derived).decrypt_into(buf, 0)
    candidate = af_merge(buf, hdr.key_bytes, slot.stripes, hdr.hash_spec)
    return candidate if volume_key_matches(hdr, candidate) else None


def _secrets(passphrase, key_file) -> list[bytes]:
    out = []
    for s in (passphrase, key_file):
        if s is not None:
            if isinstance(s, str):
                s = s.encode()
            out.append(bytes(s))
    return out


def unlock_detailed(header_dev: BlockDevice, *, passphrase=None, key_file=None, volume_key=None,
                    key_slot=None, header: LuksHeader | None = None) -> tuple[LuksHeader, bytes, int | None]:
    """Like :func:`unlock`, also returning the slot that opened (None when a volume key was given)."""
    hdr = header if header is not None else read_header(header_dev)
    if key_slot is not None:
        if not isinstance(key_slot, int) or not 0 <= key_slot < NUM_KEYS:
            raise InvalidArgumentError(f"key slot {key_slot!r} is out of range (0-{NUM_KEYS - 1})")
    if volume_key is not None:
        if len(volume_key) != hdr.key_bytes:
            raise WrongPassphraseError(
                f"the volume key has {len(volume_key) * 8} bits, the LUKS volume uses {hdr.key_bytes * 8}"
            )
        if not volume_key_matches(hdr, bytes(volume_key)):
            raise WrongPassphraseError("the volume key does not match the LUKS master-key digest")
        return hdr, bytes(volume_key), None
    secrets = _secrets(passphrase, key_file)
    if not secrets:
        raise SecretRequiredError("the LUKS volume needs a passphrase, key file or volume key")
    if key_slot is not None:
        if not hdr.key_slots[key_slot].active:
            raise InvalidArgumentError(f"LUKS key slot {key_slot} is not active")
        slots = [hdr.key_slots[key_slot]]
    else:
        slots = [s for s in hdr.key_slots if s.active]
    for slot in slots:
        material = header_dev.pread(material_length(hdr, slot), slot.key_material_offset * SECTOR_SIZE)
        for secret in secrets:
            key = try_slot(hdr, slot, material, secret)
            if key is not None:
                return hdr, key, slot.index
    which = f"key slot {key_slot}" if key_slot is not None else "no key slot"
    if key_slot is not None:
        raise WrongPassphraseError(f"{which} does not open with the given passphrase or key file")
    raise WrongPassphraseError("no key slot opens with the given passphrase or key file")


def unlock(header_dev: BlockDevice, *, passphrase=None, key_file=None, volume_key=None,
           key_slot=None) -> tuple[LuksHeader, bytes]:
    """Parse the header on ``header_dev`` and recover the volume key.

    Tries ``passphrase`` and ``key_file`` (bytes) on every active slot (or only ``key_slot``),
    or checks a given ``volume_key`` against the digest.  WrongPassphraseError when nothing
    matches, SecretRequiredError when no secret is given.
    """
    hdr, key, _ = unlock_detailed(header_dev, passphrase=passphrase, key_file=key_file,
                                  volume_key=volume_key, key_slot=key_slot)
    return hdr, key


__all__ = [
    "pbkdf2", "af_split", "af_merge", "mk_digest", "volume_key_matches", "read_header", "encrypt_material",
    "try_slot", "unlock", "unlock_detailed", "MAX_ITERATIONS",
]
