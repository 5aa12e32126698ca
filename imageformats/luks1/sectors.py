"""Sector encryption: cipher modes (xts, cbc, ecb) and IV generators (plain, plain64, plain64be, essiv, null).

LUKS1 spec 1.2.3, "Cipher and hash specification" and the dm-crypt IV generators: every 512-byte
sector is encrypted independently; its IV is derived from the sector number counted from the
start of the encrypted area (the payload, or a key slot's key material).

Speed: Python must not touch single sectors.  A request's sectors are processed together:
XTS computes every sector's initial tweak with one AES-ECB call, multiplies the tweaks by
alpha^j (GF(2^128) doubling) with a few vectorised numpy operations, and encrypts all blocks
with one more AES-ECB call.  CBC decryption is one ECB call plus a shifted XOR; CBC
encryption walks the 32 block positions of all sectors at once (32 ECB calls per request,
not one per sector).  OpenSSL does the AES, numpy the XORs.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import InvalidArgumentError, UnsupportedFeatureError

SECTOR_SIZE = 512
_BLOCK = 16
_BLOCKS_PER_SECTOR = SECTOR_SIZE // _BLOCK
_WORDS_PER_SECTOR = SECTOR_SIZE // 8

#: Sectors processed per numpy/OpenSSL batch (256 KiB: the scratch buffers stay in L2 cache).
CHUNK_SECTORS = 1024
#: Requests at least this many sectors are split over two threads (numpy releases the GIL).
PARALLEL_SECTORS = CHUNK_SECTORS

#: Block ciphers with a 128-bit block that OpenSSL (through `cryptography`) provides.
_ALGORITHMS = {
    "aes": (algorithms.AES, (16, 24, 32)),
}
#: Ciphers LUKS volumes use that no maintained Python library here provides.
_KNOWN_UNSUPPORTED = ("serpent", "twofish", "cast5", "cast6", "blowfish", "des3_ede", "camellia", "sm4", "anubis")

_CHAINS = ("xts", "cbc", "ecb")

#: LUKS hash-spec names -> hashlib names (LUKS1 spec 1.2.3, "Valid hash specifications").
HASH_NAMES = {
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "ripemd160": "ripemd160",
    "whirlpool": "whirlpool",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
    "sm3": "sm3",
}


def hash_constructor(spec: str):
    """A hashlib constructor for a LUKS hash spec, or UnsupportedFeatureError naming it."""
    name = HASH_NAMES.get(spec.lower())
    if name is None:
        raise UnsupportedFeatureError(f"hash {spec!r} is not supported (supported: {', '.join(HASH_NAMES)})")
    try:
        hashlib.new(name)
    except (ValueError, TypeError):
        raise UnsupportedFeatureError(
            f"hash {spec!r} is not available in this platform's OpenSSL/hashlib"
        ) from None

    def new(data: bytes = b""):
        return hashlib.new(name, data)

    new.digest_size = hashlib.new(name).digest_size  # type: ignore[attr-defined]
    new.hashlib_name = name  # type: ignore[attr-defined]
    return new


def parse_cipher(cipher_name: str, cipher_mode: str):
    """(algorithm class, valid key sizes, chain, ivgen, ivgen hash) for a LUKS cipher name and mode.

    ``cipher_mode`` is ``CHAIN[-IVGEN[:HASH]]`` (``xts-plain64``, ``cbc-essiv:sha256``, ``ecb``).
    """
    name = cipher_name.lower()
    if name not in _ALGORITHMS:
        raise UnsupportedFeatureError(
            f"cipher {cipher_name!r} is not supported (supported: {', '.join(_ALGORITHMS)})"
        )
    alg, sizes = _ALGORITHMS[name]
    chain, _, ivspec = cipher_mode.lower().partition("-")
    if chain not in _CHAINS:
        raise UnsupportedFeatureError(f"cipher mode {cipher_mode!r} is not supported (chain modes: xts, cbc, ecb)")
    ivgen, _, ivhash = ivspec.partition(":")
    if chain == "ecb":
        if ivgen not in ("", "null"):
            raise UnsupportedFeatureError(f"cipher mode {cipher_mode!r}: ecb takes no IV generator")
        ivgen = "null"
    elif ivgen not in ("plain", "plain64", "plain64be", "essiv", "null"):
        raise UnsupportedFeatureError(
            f"IV generator {ivspec!r} in cipher mode {cipher_mode!r} is not supported "
            "(supported: plain, plain64, plain64be, essiv:HASH, null)"
        )
    if ivgen == "essiv":
        if not ivhash:
            raise UnsupportedFeatureError(f"cipher mode {cipher_mode!r}: essiv needs a hash (essiv:sha256)")
    elif ivhash:
        raise UnsupportedFeatureError(f"cipher mode {cipher_mode!r}: only essiv takes a hash")
    return alg, sizes, chain, ivgen, ivhash


def check_key_size(cipher_name: str, cipher_mode: str, key_bytes: int) -> None:
    """Raise unless ``key_bytes`` is a valid volume-key length for the cipher and mode."""
    _, sizes, chain, _, _ = parse_cipher(cipher_name, cipher_mode)
    valid = tuple(2 * s for s in sizes) if chain == "xts" else sizes
    if key_bytes not in valid:
        raise UnsupportedFeatureError(
            f"a {key_bytes * 8}-bit key is not valid for {cipher_name}-{cipher_mode} "
            f"(valid: {', '.join(str(v * 8) for v in valid)} bits)"
        )


# -- GF(2^128) doubling for XTS (IEEE 1619 section 5.2) ------------------------------

_J = np.arange(_BLOCKS_PER_SECTOR, dtype=np.uint64)
_SH = np.uint64(63) - _J
_U1, _U2, _U7 = np.uint64(1), np.uint64(2), np.uint64(7)


@functools.lru_cache(maxsize=4)
def _shift_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(j, 63 - j) for every block j of n sectors, as contiguous (n, 32) arrays (read-only, shared)."""
    j = np.ascontiguousarray(np.broadcast_to(_J, (n, _BLOCKS_PER_SECTOR)))
    sh = np.ascontiguousarray(np.broadcast_to(_SH, (n, _BLOCKS_PER_SECTOR)))
    j.flags.writeable = False
    sh.flags.writeable = False
    return j, sh


def _xts_tweaks(t0: np.ndarray, out: np.ndarray, st: "_Scratch", n: int) -> None:
    """out[i, j] = t0[i] * alpha^j for j < 32, as little-endian (lo, hi) uint64 pairs.

    Multiplying by x^j shifts the 128-bit value left by j bits; the j bits pushed out of the
    top come back reduced by x^128 = x^7 + x^2 + x + 1 (a carry-less multiply by 0x87, which
    for j < 32 never overflows the low word).  Every operation runs on contiguous (n, 32)
    arrays (broadcasting against a (32,) shift vector is 3x slower in numpy), and the two
    halves are interleaved into ``out`` once at the end.
    """
    jj, sh = _shift_tables(max(n, CHUNK_SECTORS))  # one table for every request size: slice it
    jj, sh = jj[:n], sh[:n]
    hr, lr, o, t, lo_out, hi_out = st.hr[:n], st.lr[:n], st.o[:n], st.t[:n], st.lo[:n], st.hi[:n]
    hr[:] = t0[:, 1:2]
    lr[:] = t0[:, 0:1]
    np.right_shift(hr, _U1, out=o)
    np.right_shift(o, sh, out=o)  # the top j bits of hi (j = 0 gives 0)
    np.right_shift(lr, _U1, out=t)
    np.right_shift(t, sh, out=t)  # the top j bits of lo
    np.left_shift(hr, jj, out=hi_out)
    np.bitwise_or(hi_out, t, out=hi_out)
    np.left_shift(lr, jj, out=lo_out)
    np.bitwise_xor(lo_out, o, out=lo_out)
    np.left_shift(o, _U1, out=t)
    np.bitwise_xor(lo_out, t, out=lo_out)
    np.left_shift(o, _U2, out=t)
    np.bitwise_xor(lo_out, t, out=lo_out)
    np.left_shift(o, _U7, out=t)
    np.bitwise_xor(lo_out, t, out=lo_out)
    out[:, :, 0] = lo_out
    out[:, :, 1] = hi_out


# -- per-thread state ----------------------------------------------------------------


class _Scratch:
    """ECB contexts and buffers for one thread (cryptography contexts are not thread-safe)."""

    def __init__(self, owner: "SectorCipher", n: int):
        alg = owner._alg
        k1 = owner._data_key
        self.enc = Cipher(alg(k1), modes.ECB()).encryptor()
        self.dec = Cipher(alg(k1), modes.ECB()).decryptor()
        self.tweak = Cipher(alg(owner._tweak_key), modes.ECB()).encryptor() if owner._tweak_key else None
        self.essiv = Cipher(alg(owner._essiv_key), modes.ECB()).encryptor() if owner._essiv_key else None
        self.n = n  # sectors the buffers hold (grown on demand up to CHUNK_SECTORS)
        self.iv = np.zeros((n, 2), np.uint64)
        self.iv_out = bytearray(n * _BLOCK + _BLOCK)
        self.essiv_out = bytearray(n * _BLOCK + _BLOCK)
        self.tweaks = np.empty((n, _BLOCKS_PER_SECTOR, 2), np.uint64)
        self.o = np.empty((n, _BLOCKS_PER_SECTOR), np.uint64)
        self.t = np.empty((n, _BLOCKS_PER_SECTOR), np.uint64)
        self.lo = np.empty((n, _BLOCKS_PER_SECTOR), np.uint64)
        self.hi = np.empty((n, _BLOCKS_PER_SECTOR), np.uint64)
        self.hr = np.empty((n, _BLOCKS_PER_SECTOR), np.uint64)
        self.lr = np.empty((n, _BLOCKS_PER_SECTOR), np.uint64)
        self.tmp = np.empty(n * _WORDS_PER_SECTOR, np.uint64)
        self.out = bytearray(n * SECTOR_SIZE + _BLOCK)
        self.col = np.empty((n, 2), np.uint64)
        self.col_out = bytearray(n * _BLOCK + _BLOCK)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
#: Held while a request is split over the helper thread; other callers (clones on other threads,
#: which already keep the second core busy) then run serially instead of queueing for it.
_split_lock = threading.Lock()


def _helper_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="luks-sectors")
    return _pool


class SectorCipher:
    """Encrypt or decrypt whole 512-byte sectors in place with a LUKS cipher spec.

        SectorCipher("aes", "xts-plain64", key).decrypt_into(buf, first_sector)

    ``first_sector`` is the IV sector number of ``buf[0:512]``; sector i of the buffer uses
    ``first_sector + i``.  Safe to share between threads (each thread gets its own OpenSSL
    contexts).  The key is kept only inside OpenSSL contexts and private attributes; the repr
    shows the cipher spec alone.
    """

    def __init__(self, cipher_name: str, cipher_mode: str, key: bytes):
        alg, sizes, chain, ivgen, ivhash = parse_cipher(cipher_name, cipher_mode)
        key = bytes(key)
        check_key_size(cipher_name, cipher_mode, len(key))
        self.cipher_name = cipher_name
        self.cipher_mode = cipher_mode
        self.key_bytes = len(key)
        self._alg = alg
        self._chain = chain
        self._ivgen = ivgen
        if chain == "xts":
            half = len(key) // 2
            self._data_key, self._tweak_key = key[:half], key[half:]
        else:
            self._data_key, self._tweak_key = key, None
        self._essiv_key = None
        if ivgen == "essiv":
            # dm-crypt ESSIV: IV = E_{H(volume key)}(plain64 sector number), same block cipher.
            digest = hash_constructor(ivhash)(key).digest()
            if len(digest) not in sizes:
                raise UnsupportedFeatureError(
                    f"essiv:{ivhash} gives a {len(digest) * 8}-bit key, not valid for {cipher_name}"
                )
            self._essiv_key = digest
        self._local = threading.local()
        self._local.st = _Scratch(self, 1)  # fail now, not on first I/O, if OpenSSL rejects the key

    def __repr__(self) -> str:
        return f"<SectorCipher {self.cipher_name}-{self.cipher_mode} {self.key_bytes * 8}-bit>"

    def _scratch(self, nsec: int) -> _Scratch:
        st = getattr(self._local, "st", None)
        if st is None or st.n < nsec:
            st = self._local.st = _Scratch(self, min(CHUNK_SECTORS, max(nsec, 2 * (st.n if st else 0))))
        return st

    # -- public API --------------------------------------------------------------------

    def decrypt_into(self, buf, first_sector: int) -> None:
        """Decrypt ``buf`` (a writable buffer of whole sectors) in place."""
        self._run(buf, first_sector, False)

    def encrypt_into(self, buf, first_sector: int) -> None:
        """Encrypt ``buf`` (a writable buffer of whole sectors) in place."""
        self._run(buf, first_sector, True)

    def _run(self, buf, first_sector: int, encrypt: bool) -> None:
        mv = memoryview(buf).cast("B")
        if mv.readonly:
            raise InvalidArgumentError("sector buffer is read-only")
        if len(mv) % SECTOR_SIZE:
            raise InvalidArgumentError(f"buffer length {len(mv)} is not a multiple of {SECTOR_SIZE}")
        nsec = len(mv) // SECTOR_SIZE
        if first_sector < 0 or first_sector + nsec > 1 << 64:
            raise InvalidArgumentError(f"sector numbers {first_sector}..{first_sector + nsec - 1} are outside 0..2^64-1")
        if nsec >= PARALLEL_SECTORS and _split_lock.acquire(blocking=False):
            # Two halves on two threads: numpy's XOR and shift loops release the GIL.
            try:
                half = (nsec // 2 // CHUNK_SECTORS) * CHUNK_SECTORS or nsec // 2
                fut = _helper_pool().submit(self._chunks, mv[half * SECTOR_SIZE:], first_sector + half, encrypt)
                try:
                    self._chunks(mv[: half * SECTOR_SIZE], first_sector, encrypt)
                finally:
                    fut.result()
            finally:
                _split_lock.release()
        else:
            self._chunks(mv, first_sector, encrypt)

    def _chunks(self, mv: memoryview, first_sector: int, encrypt: bool) -> None:
        step = CHUNK_SECTORS * SECTOR_SIZE
        st = self._scratch(min(CHUNK_SECTORS, len(mv) // SECTOR_SIZE))
        for pos in range(0, len(mv), step):
            piece = mv[pos : pos + step]
            sector = first_sector + pos // SECTOR_SIZE
            if self._chain == "xts":
                self._xts(st, piece, sector, encrypt)
            elif self._chain == "cbc":
                (self._cbc_encrypt if encrypt else self._cbc_decrypt)(st, piece, sector)
            else:
                self._ecb(st, piece, encrypt)

    # -- IV generators (dm-crypt: plain, plain64, plain64be, essiv, null) ---------------

    def _ivs(self, st: _Scratch, first: int, n: int) -> np.ndarray:
        iv = st.iv[:n]
        gen = self._ivgen
        if gen == "null":
            iv[:] = 0
            return iv
        sectors = np.arange(first, first + n, dtype=np.uint64)
        if gen == "plain":
            iv[:, 0] = sectors & np.uint64(0xFFFFFFFF)
            iv[:, 1] = 0
        elif gen == "plain64be":
            iv[:, 0] = 0
            iv[:, 1] = sectors.byteswap()  # big-endian sector number in the last 8 bytes
        else:  # plain64 and essiv's input
            iv[:, 0] = sectors
            iv[:, 1] = 0
        if gen == "essiv":
            st.essiv.update_into(memoryview(iv).cast("B"), st.essiv_out)
            return np.frombuffer(st.essiv_out, np.uint64, count=2 * n).reshape(n, 2)
        return iv

    # -- modes -------------------------------------------------------------------------

    def _xts(self, st: _Scratch, mv: memoryview, first: int, encrypt: bool) -> None:
        # IEEE 1619 XTS with a 512-byte data unit; the tweak is the sector's IV.
        n = len(mv) // SECTOR_SIZE
        words = n * _WORDS_PER_SECTOR
        iv = self._ivs(st, first, n)
        st.tweak.update_into(memoryview(iv).cast("B"), st.iv_out)
        t0 = np.frombuffer(st.iv_out, np.uint64, count=2 * n).reshape(n, 2)
        tw = st.tweaks[:n]
        _xts_tweaks(t0, tw, st, n)
        tw = tw.reshape(words)
        data = np.frombuffer(mv, np.uint64)
        tmp = st.tmp[:words]
        np.bitwise_xor(data, tw, out=tmp)
        (st.enc if encrypt else st.dec).update_into(memoryview(tmp).cast("B"), st.out)
        np.bitwise_xor(np.frombuffer(st.out, np.uint64, count=words), tw, out=data)

    def _cbc_decrypt(self, st: _Scratch, mv: memoryview, first: int) -> None:
        # P[j] = D(C[j]) ^ C[j-1], C[-1] = IV: one ECB call over every block, then a shifted XOR.
        n = len(mv) // SECTOR_SIZE
        words = n * _WORDS_PER_SECTOR
        iv = self._ivs(st, first, n)
        st.dec.update_into(mv, st.out)
        plain = np.frombuffer(st.out, np.uint64, count=words).reshape(n, _BLOCKS_PER_SECTOR, 2)
        cipher = np.frombuffer(mv, np.uint64).reshape(n, _BLOCKS_PER_SECTOR, 2)
        np.bitwise_xor(plain[:, 1:], cipher[:, :-1], out=plain[:, 1:])
        np.bitwise_xor(plain[:, 0], iv, out=plain[:, 0])
        cipher[:] = plain

    def _cbc_encrypt(self, st: _Scratch, mv: memoryview, first: int) -> None:
        # C[j] = E(P[j] ^ C[j-1]): sequential within a sector, so walk block j of every sector at once.
        n = len(mv) // SECTOR_SIZE
        prev = self._ivs(st, first, n)
        data = np.frombuffer(mv, np.uint64).reshape(n, _BLOCKS_PER_SECTOR, 2)
        col = st.col[:n]
        col_bytes = memoryview(col).cast("B")
        for j in range(_BLOCKS_PER_SECTOR):
            np.bitwise_xor(data[:, j], prev, out=col)
            st.enc.update_into(col_bytes, st.col_out)
            data[:, j] = np.frombuffer(st.col_out, np.uint64, count=2 * n).reshape(n, 2)
            prev = data[:, j]

    def _ecb(self, st: _Scratch, mv: memoryview, encrypt: bool) -> None:
        (st.enc if encrypt else st.dec).update_into(mv, st.out)
        mv[:] = memoryview(st.out)[: len(mv)]


__all__ = ["SectorCipher", "SECTOR_SIZE", "parse_cipher", "check_key_size", "hash_constructor", "HASH_NAMES"]
