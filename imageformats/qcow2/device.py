"""Qcow2Device: a qcow2 image as a block device (reading everything qemu writes; in-place writing).

Spec: qemu ``docs/interop/qcow2.rst``; each piece of code names the section it implements.
"""

from __future__ import annotations

import os
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import zstandard

try:  # ISA-L inflates raw deflate about twice as fast as zlib; same API, same results
    from isal import isal_zlib as _inflate_lib
except ImportError:  # pragma: no cover - isal is a dependency, zlib the fallback
    _inflate_lib = zlib
_INFLATE_ERRORS = (zlib.error, _inflate_lib.error)

from ..block import BlockDevice, Extent, FileDevice, SliceDevice
from ..errors import (
    CorruptImageError,
    DeviceIOError,
    ImageFormatError,
    InvalidArgumentError,
    NotFastError,
    ReadOnlyError,
    UnsupportedFeatureError,
)
from . import header as H
from . import tables as T

#: Deepest backing chain opened (a guard against hostile chains).
MAX_BACKING_DEPTH = 32
#: Default bound of the L2 table cache, bytes (shared by clones).
DEFAULT_L2_CACHE = 32 * 1024 * 1024
#: Bound of the decompressed-cluster cache, bytes.
DEFAULT_COMPRESSED_CACHE = 8 * 1024 * 1024
#: L1 entries read per L1 cache block.
L1_BLOCK_ENTRIES = 8192
#: Compressed clusters in one read before decompression goes to the thread pool.
PARALLEL_DECOMPRESS_MIN = 4
#: Gap (bytes) between compressed clusters still read in one backing request.
COMPRESSED_READ_GAP = 64 * 1024

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _decompress_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="qcow2-z")
        return _pool


def _leaf_path(dev: BlockDevice) -> str | None:
    for layer in dev.layers():
        path = getattr(layer, "path", None)
        if isinstance(layer, FileDevice) and path:
            return os.path.realpath(path)
    return None


class _View(SliceDevice):
    """A window on the qcow2 file that does not own (close) it."""

    def close(self) -> None:
        self._closed = True


def _leaf_url(dev: BlockDevice) -> str | None:
    for layer in dev.layers():
        url = getattr(layer, "url", None) or getattr(getattr(layer, "_s", None), "url", None)
        if isinstance(url, str) and "://" in url:
            return url
    return None


class _Image:
    """State shared by a device and its clones: parsed header, caches, the metadata lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()


class Qcow2Device(BlockDevice):
    """A qcow2 image over ``backing`` (the device holding the qcow2 file).

    Options (all optional): ``base_dir`` (directory for relative backing/data-file
    names), ``snapshot`` (open an internal snapshot by id or name, read-only),
    ``backing_image`` (a device to use instead of opening the backing file named
    in the header; ``False`` opens no backing image at all), ``data_file`` (a
    device for the external data file), ``l2_cache_size`` (bytes), and the
    secrets ``passphrase`` / ``key_file`` / ``volume_key`` / ``key_slot`` for LUKS.
    """

    format_name = "qcow2"
    can_extents = True

    def __init__(self, backing: BlockDevice, *, writable: bool = False, options: dict[str, Any] | None = None):
        self.backing = backing
        self.backing_image: BlockDevice | None = None
        self.data_dev: BlockDevice | None = None
        self._cipher = None
        options = dict(options or {})
        img = _Image()
        self._img = img
        try:
            self._open(options, writable)
        except BaseException:
            self._close_children(close_backing=False)
            raise

    # ------------------------------------------------------------------ opening

    def _open(self, options: dict[str, Any], writable: bool) -> None:
        img = self._img
        dev = self.backing
        fsize = dev.size
        if fsize < H.HEADER_V2_LENGTH:
            raise CorruptImageError(f"qcow2 image is truncated: {fsize} bytes, smaller than the 72-byte header")
        head = dev.pread(min(fsize, 4096), 0)
        try:
            hdr = H.Header.parse(head)
        except Exception as exc:  # construct raises many classes
            raise CorruptImageError(f"not a qcow2 header: {exc.__class__.__name__}") from None
        img.header = hdr
        # "Header": version, cluster_bits, header_length, refcount_order
        if hdr.version not in (2, 3):
            raise UnsupportedFeatureError(f"qcow2 version {hdr.version} (only versions 2 and 3 exist)")
        if not H.MIN_CLUSTER_BITS <= hdr.cluster_bits <= H.MAX_CLUSTER_BITS:
            raise CorruptImageError(f"qcow2 cluster_bits {hdr.cluster_bits} outside 9..21 (512 B to 2 MiB clusters)")
        cb = img.cluster_bits = hdr.cluster_bits
        cs = img.cluster_size = 1 << cb
        img.version = hdr.version
        if hdr.version == 2:
            img.header_length = H.HEADER_V2_LENGTH
            img.incompat = img.compat = img.autoclear = 0
            img.refcount_order = H.DEFAULT_REFCOUNT_ORDER
            img.compression_type = H.COMPRESSION_DEFLATE
        else:
            img.header_length = hdr.header_length
            if hdr.header_length < H.HEADER_V3_MIN_LENGTH or hdr.header_length % 8 or hdr.header_length > cs:
                raise CorruptImageError(f"qcow2 header_length {hdr.header_length} is invalid")
            img.incompat = hdr.incompatible_features
            img.compat = hdr.compatible_features
            img.autoclear = hdr.autoclear_features
            img.refcount_order = hdr.refcount_order
            img.compression_type = hdr.compression_type or 0
        if img.refcount_order > H.MAX_REFCOUNT_ORDER:
            raise CorruptImageError(f"qcow2 refcount_order {img.refcount_order} exceeds 6")
        # Header extensions come first: the feature name table names unknown bits.
        first_cluster = dev.pread(min(fsize, cs), 0) if fsize > len(head) and cs > len(head) else head[:cs]
        self._parse_extensions(first_cluster)
        unknown = img.incompat & ~H.INCOMPAT_KNOWN
        if unknown:
            names = []
            for bit in range(64):
                if unknown >> bit & 1:
                    label = img.feature_names.get((H.FEATURE_TYPE_INCOMPAT, bit))
                    names.append(f"bit {bit}" + (f" ({label})" if label else ""))
            raise UnsupportedFeatureError(f"qcow2 image uses unknown incompatible features: {', '.join(names)}")
        img.extended_l2 = bool(img.incompat & H.INCOMPAT_EXTL2)
        if img.extended_l2 and cb < H.MIN_CLUSTER_BITS_EXTENDED_L2:
            raise CorruptImageError("qcow2 extended L2 entries need clusters of at least 16 KiB")
        if bool(img.incompat & H.INCOMPAT_COMPRESSION) != (img.compression_type != 0):
            raise CorruptImageError("qcow2 compression type bit and compression_type field disagree")
        if img.compression_type not in H.COMPRESSION_NAMES:
            raise UnsupportedFeatureError(f"qcow2 compression type {img.compression_type}")
        img.dirty = bool(img.incompat & H.INCOMPAT_DIRTY)
        img.corrupt = bool(img.incompat & H.INCOMPAT_CORRUPT)
        img.has_data_file = bool(img.incompat & H.INCOMPAT_DATA_FILE)
        img.data_file_raw = bool(img.autoclear & H.AUTOCLEAR_DATA_FILE_RAW)
        img.lazy_refcounts = bool(img.compat & H.COMPAT_LAZY_REFCOUNTS)
        img.l2_entry_size = H.L2_EXTENDED_ENTRY_SIZE if img.extended_l2 else H.L2_ENTRY_SIZE
        img.l2_entries = cs // img.l2_entry_size
        img.unit_bits = cb - 5 if img.extended_l2 else cb
        img.l2_span = img.l2_entries * cs  # guest bytes one L2 table maps
        img.size = hdr.size
        img.crypt_method = hdr.crypt_method

        # "Header": writability
        if writable and img.corrupt:
            warnings.warn("qcow2 image is marked corrupt; opening it read-only", stacklevel=4)
            writable = False
        if writable and img.dirty:
            raise ReadOnlyError("qcow2 image is dirty (refcounts may be stale): repair it with 'qemu-img check -r all' before writing")

        # "Snapshots"
        img.snapshots = self._read_snapshot_table()
        l1_offset, l1_size = hdr.l1_table_offset, hdr.l1_size
        img.snapshot = None
        snap_name = options.get("snapshot")
        if snap_name is not None:
            snap = self._find_snapshot(str(snap_name))
            img.snapshot = snap
            l1_offset, l1_size = snap["l1_table_offset"], snap["l1_size"]
            if snap.get("disk_size") is not None:
                img.size = snap["disk_size"]
            writable = False
        self._set_l1(l1_offset, l1_size)

        # "Header": refcount table location (used by the writer and sanity checks)
        img.refcount_table_offset = hdr.refcount_table_offset
        img.refcount_table_clusters = hdr.refcount_table_clusters
        if hdr.refcount_table_offset % cs:
            raise CorruptImageError("qcow2 refcount table is not cluster-aligned")
        if hdr.refcount_table_clusters * cs > H.MAX_REFCOUNT_TABLE_BYTES:
            raise CorruptImageError(f"qcow2 refcount table of {hdr.refcount_table_clusters} clusters is too large")
        if hdr.refcount_table_clusters == 0 or hdr.refcount_table_offset == 0 or (
            hdr.refcount_table_offset + hdr.refcount_table_clusters * cs > fsize
        ):
            raise CorruptImageError("qcow2 refcount table lies outside the file")

        img.l2_cache = T.LRUCache(int(options.get("l2_cache_size", DEFAULT_L2_CACHE)))
        img.l1_cache = T.LRUCache(4 * L1_BLOCK_ENTRIES * 8 * 4)
        img.z_cache = T.LRUCache(DEFAULT_COMPRESSED_CACHE)

        # "External data file" (incompatible bit 2)
        if img.has_data_file:
            if img.snapshots:
                raise CorruptImageError("qcow2 image has both an external data file and internal snapshots")
            given = options.get("data_file")
            if isinstance(given, BlockDevice):
                self.data_dev = given
            else:
                if img.data_file_name is None:
                    raise UnsupportedFeatureError("qcow2 image uses an external data file but does not name it")
                path = self._resolve(img.data_file_name, options)
                self.data_dev = FileDevice(path, writable=writable)
        else:
            self.data_dev = self.backing
            if img.data_file_raw:
                raise CorruptImageError("qcow2 raw-external-data bit set without an external data file")

        # "Data encryption"
        img.iv_physical = img.crypt_method == H.CRYPT_LUKS
        if img.crypt_method == H.CRYPT_AES:
            self._open_aes(options)
            writable = False
        elif img.crypt_method == H.CRYPT_LUKS:
            self._open_luks(options)
        elif img.crypt_method != H.CRYPT_NONE:
            raise UnsupportedFeatureError(f"qcow2 crypt_method {img.crypt_method}")
        elif img.crypto_header is not None:
            raise CorruptImageError("qcow2 encryption header extension present without encryption")

        # "Header": backing file
        img.backing_file = None
        if hdr.backing_file_offset:
            if img.data_file_raw:
                raise CorruptImageError("qcow2 image has a backing file and raw external data")
            n = hdr.backing_file_size
            if n > H.MAX_BACKING_FILE_NAME or n == 0:
                raise CorruptImageError(f"qcow2 backing file name length {n} is invalid")
            if hdr.backing_file_offset + n > min(fsize, cs):
                raise CorruptImageError("qcow2 backing file name lies outside the first cluster")
            raw = dev.pread(n, hdr.backing_file_offset)
            try:
                img.backing_file = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptImageError("qcow2 backing file name is not UTF-8") from None
        self.backing_chain_info: list[dict[str, Any]] = []
        self._open_backing_image(options)

        self.size = img.size
        self.readonly = not writable
        img.writable = writable
        self.block_size = (512 if img.crypt_method else 1, max(4096, 1 << img.unit_bits) if cb <= 16 else 1 << cb, 32 << 20)
        self.can_zero = writable
        self.can_trim = writable
        self.can_multi_conn = not writable
        if writable:
            self._prepare_write()

    def _parse_extensions(self, first: bytes) -> None:
        """"Header extensions": walk them from header_length to the end marker."""
        img = self._img
        img.feature_names = {}
        img.backing_format = None
        img.data_file_name = None
        img.crypto_header = None
        img.bitmaps = None
        img.extensions = []
        pos = img.header_length
        hdr = img.header
        limit = len(first)
        if hdr.backing_file_offset and hdr.backing_file_offset < limit:
            limit = max(pos, hdr.backing_file_offset)
        seen = set()
        while pos + H.EXTENSION_HEADER_SIZE <= limit:
            ext = H.ExtensionHeader.parse(first[pos : pos + 8])
            if ext.type == H.EXT_END:
                return
            data_end = pos + 8 + ext.length
            if data_end > limit:
                raise CorruptImageError(f"qcow2 header extension {ext.type:#010x} runs past the first cluster")
            data = first[pos + 8 : data_end]
            if ext.type in seen and ext.type in H.EXT_NAMES:
                raise CorruptImageError(f"qcow2 header extension {H.EXT_NAMES[ext.type]} appears twice")
            seen.add(ext.type)
            img.extensions.append(ext.type)
            if ext.type == H.EXT_BACKING_FORMAT:
                img.backing_format = data.decode("utf-8", "replace")
            elif ext.type == H.EXT_DATA_FILE:
                img.data_file_name = data.decode("utf-8", "replace")
            elif ext.type == H.EXT_FEATURE_NAMES:
                for i in range(0, len(data) - H.FEATURE_NAME_ENTRY_SIZE + 1, H.FEATURE_NAME_ENTRY_SIZE):
                    fe = H.FeatureNameEntry.parse(data[i : i + H.FEATURE_NAME_ENTRY_SIZE])
                    img.feature_names[(fe.type, fe.bit)] = fe.name.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif ext.type == H.EXT_CRYPTO_HEADER:
                if len(data) < 16:
                    raise CorruptImageError("qcow2 encryption header extension is too short")
                img.crypto_header = H.CryptoHeaderExtension.parse(data)
            elif ext.type == H.EXT_BITMAPS:
                if len(data) >= 24:
                    img.bitmaps = H.BitmapsExtension.parse(data)
            pos = data_end + (-ext.length % 8)

    def _read_snapshot_table(self) -> list[dict[str, Any]]:
        """"Snapshots": the snapshot table (bounded: count, extra data, file size)."""
        img = self._img
        hdr = img.header
        n = hdr.nb_snapshots
        if n == 0:
            return []
        if n > H.MAX_SNAPSHOTS:
            raise CorruptImageError(f"qcow2 image claims {n} snapshots")
        if hdr.snapshots_offset % img.cluster_size or hdr.snapshots_offset == 0:
            raise CorruptImageError("qcow2 snapshot table is not cluster-aligned")
        fsize = self.backing.size
        pos = hdr.snapshots_offset
        out = []
        for i in range(n):
            if pos + H.SNAPSHOT_ENTRY_FIXED_SIZE > fsize:
                raise CorruptImageError(f"qcow2 snapshot table entry {i} lies outside the file")
            fixed = self.backing.pread(H.SNAPSHOT_ENTRY_FIXED_SIZE, pos)
            extra_size = int.from_bytes(fixed[36:40], "big")
            id_size = int.from_bytes(fixed[12:14], "big")
            name_size = int.from_bytes(fixed[14:16], "big")
            if extra_size > H.MAX_SNAPSHOT_EXTRA:
                raise CorruptImageError(f"qcow2 snapshot {i} has {extra_size} bytes of extra data")
            total = H.snapshot_entry_size(extra_size, id_size, name_size)
            if pos + H.SNAPSHOT_ENTRY_FIXED_SIZE + extra_size + id_size + name_size > fsize:
                raise CorruptImageError(f"qcow2 snapshot table entry {i} lies outside the file")
            raw = self.backing.pread(H.SNAPSHOT_ENTRY_FIXED_SIZE + extra_size + id_size + name_size, pos)
            ent = H.SnapshotEntry.parse(raw)
            extra = ent.extra_data
            disk_size = None
            vm_state = ent.vm_state_size
            if len(extra) >= 8:
                vm_state = int.from_bytes(extra[0:8], "big")
            if len(extra) >= 16:
                disk_size = int.from_bytes(extra[8:16], "big")
            out.append({
                "id": ent.id_str.decode("utf-8", "replace"),
                "name": ent.name.decode("utf-8", "replace"),
                "l1_table_offset": ent.l1_table_offset,
                "l1_size": ent.l1_size,
                "date_sec": ent.date_sec,
                "date_nsec": ent.date_nsec,
                "vm_clock_nsec": ent.vm_clock_nsec,
                "vm_state_size": vm_state,
                "disk_size": disk_size,
            })
            pos += total
        return out

    def _find_snapshot(self, key: str) -> dict[str, Any]:
        snaps = self._img.snapshots
        for snap in snaps:
            if snap["id"] == key:
                return snap
        for snap in snaps:
            if snap["name"] == key:
                return snap
        known = ", ".join(f"{s['id']} ({s['name']})" for s in snaps) or "none"
        raise InvalidArgumentError(f"qcow2 image has no snapshot with id or name {key!r} (snapshots: {known})")

    def _set_l1(self, offset: int, entries: int) -> None:
        """"Cluster mapping": the L1 table must cover the virtual size and lie in the file."""
        img = self._img
        cs = img.cluster_size
        need = -(-img.size // img.l2_span) if img.size else 0
        if entries < need:
            raise CorruptImageError(f"qcow2 L1 table has {entries} entries, {need} needed for the virtual size")
        if entries * 8 > H.MAX_L1_BYTES:
            raise CorruptImageError(f"qcow2 L1 table of {entries} entries exceeds 32 MiB")
        if entries and (offset % cs or offset == 0):
            raise CorruptImageError(f"qcow2 L1 table offset {offset:#x} is not cluster-aligned")
        if offset + entries * 8 > self.backing.size:
            raise CorruptImageError("qcow2 L1 table lies outside the file")
        img.l1_offset = offset
        img.l1_size = entries

    def _resolve(self, name: str, options: dict[str, Any]) -> str:
        if "\0" in name:
            raise CorruptImageError(f"qcow2 backing/data file name {name!r} contains a NUL byte")
        if name.startswith("json:"):
            raise UnsupportedFeatureError("qcow2 file names in json: syntax are not supported")
        remote = _leaf_url(self.backing)
        if remote is not None and (os.path.isabs(name) or ("://" in name and not name.startswith(("http://", "https://")))):
            # a remote image must not make us read local files (and serve them to NBD clients)
            raise UnsupportedFeatureError(f"qcow2 image read from a URL names a local file {name!r}; refusing it")
        if "://" in name or os.path.isabs(name):
            return name
        base = options.get("base_dir")
        if base is None:
            url = _leaf_url(self.backing)
            if url is not None:  # an image read over HTTP: its backing file is next to it
                import urllib.parse

                return urllib.parse.urljoin(url, name)
            leaf = _leaf_path(self.backing)
            base = os.path.dirname(leaf) if leaf else os.getcwd()
        return os.path.join(base, name)

    def _open_backing_image(self, options: dict[str, Any]) -> None:
        """"Header": backing_file_offset; the chain is opened with imageformats.detect.open."""
        img = self._img
        given = options.get("backing_image", None)
        if given is False or img.backing_file is None:
            return
        if isinstance(given, BlockDevice):
            self.backing_image = given
            return
        from .. import detect

        chain = tuple(options.get("_qcow2_chain", ()))
        me = _leaf_path(self.backing)
        if me and not chain:
            chain = (me,)
        if len(chain) >= MAX_BACKING_DEPTH:
            raise CorruptImageError(f"qcow2 backing chain is deeper than {MAX_BACKING_DEPTH} images")
        path = self._resolve(img.backing_file, options)
        if "://" not in path:
            real = os.path.realpath(path)
            if real in chain:
                raise CorruptImageError(f"qcow2 backing chain loops back to {img.backing_file!r}")
            if not os.path.exists(path):
                raise InvalidArgumentError(f"qcow2 backing file {img.backing_file!r} not found (looked at {path})")
            sub = {k: v for k, v in options.items() if k not in ("snapshot", "backing_image", "data_file", "base_dir")}
            sub["_qcow2_chain"] = chain + (real,)
        else:
            sub = {k: v for k, v in options.items() if k not in ("snapshot", "backing_image", "data_file", "base_dir")}
            sub["_qcow2_chain"] = chain + (path,)
        fmt = img.backing_format
        if fmt is not None and fmt not in ("raw", "file"):
            if fmt not in detect.formats():
                raise UnsupportedFeatureError(f"qcow2 backing file format {fmt!r} is not supported")
        self.backing_image = detect.open(path, format=("raw" if fmt == "file" else fmt), writable=False, **sub)

    def _open_luks(self, options: dict[str, Any]) -> None:
        """"Full disk encryption header pointer" + "Data encryption" (LUKS, physical sector IVs)."""
        img = self._img
        if img.crypto_header is None:
            raise CorruptImageError("qcow2 LUKS image lacks the encryption header extension")
        ch = img.crypto_header
        if ch.offset % img.cluster_size or ch.offset == 0 or ch.length == 0 or ch.offset + ch.length > self.backing.size:
            raise CorruptImageError("qcow2 encryption header lies outside the file")
        try:
            from ..luks1 import unlock
        except ImportError:
            raise UnsupportedFeatureError("qcow2 LUKS encryption needs imageformats.luks1") from None
        secret = {k: options.get(k) for k in ("passphrase", "key_file", "volume_key", "key_slot")}
        if not any(secret[k] is not None for k in ("passphrase", "key_file", "volume_key")):
            from ..errors import SecretRequiredError

            raise SecretRequiredError("the qcow2 image is LUKS-encrypted: give a passphrase, key file or volume key")
        hdr_dev = _View(self.backing, ch.offset, ch.length)
        luks, key = unlock(hdr_dev, **secret)
        img.luks = luks
        img.cipher_desc = f"{luks.cipher_name}-{luks.cipher_mode}"
        self._cipher = _sector_cipher(luks.cipher_name, luks.cipher_mode, key)
        img.cipher_args = (luks.cipher_name, luks.cipher_mode, key)

    def _open_aes(self, options: dict[str, Any]) -> None:
        """"Data encryption", AES: AES-128-CBC, plain64 IVs from the guest sector; the key is the
        passphrase's first 16 bytes, zero-padded (qemu's legacy qcow scheme).  Read-only."""
        img = self._img
        pw = options.get("passphrase")
        if pw is None:
            from ..errors import SecretRequiredError

            raise SecretRequiredError("the qcow2 image uses legacy AES encryption: give its passphrase")
        key = bytes(pw)[:16].ljust(16, b"\0")
        img.cipher_desc = "aes-128-cbc-plain64 (legacy qcow AES)"
        img.cipher_args = ("aes", "cbc-plain64", key)
        self._cipher = _sector_cipher(*img.cipher_args)

    # ------------------------------------------------------------------ tables

    def _l1_entry_block(self, block: int) -> np.ndarray:
        img = self._img
        arr = img.l1_cache.get(block)
        if arr is None:
            first = block * L1_BLOCK_ENTRIES
            n = min(L1_BLOCK_ENTRIES, img.l1_size - first)
            raw = self.backing.pread(n * 8, img.l1_offset + first * 8)
            arr = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
            img.l1_cache.put(block, arr, arr.nbytes)
        return arr

    def _l1_entry(self, index: int) -> int:
        return int(self._l1_entry_block(index // L1_BLOCK_ENTRIES)[index % L1_BLOCK_ENTRIES])

    def _l2_offset(self, l1_index: int) -> int:
        """Host offset of the L2 table for ``l1_index``, 0 when unallocated ("L1 table entry")."""
        img = self._img
        if l1_index >= img.l1_size:
            return 0
        off = self._l1_entry(l1_index) & H.L1E_OFFSET_MASK
        if off and (off % img.cluster_size or off + img.cluster_size > self.backing.size):
            raise CorruptImageError(f"qcow2 L1 entry {l1_index} points to {off:#x}, outside the file or unaligned")
        return off

    def _next_l1_allocated(self, index: int) -> int:
        """The first L1 index >= ``index`` with an L2 table (l1_size when there is none)."""
        img = self._img
        while index < img.l1_size:
            block = index // L1_BLOCK_ENTRIES
            arr = self._l1_entry_block(block)
            rel = index - block * L1_BLOCK_ENTRIES
            hits = np.flatnonzero(arr[rel:] & np.uint64(H.L1E_OFFSET_MASK))
            if len(hits):
                return index + int(hits[0])
            index = (block + 1) * L1_BLOCK_ENTRIES
        return max(index, img.l1_size)

    def _l2_table(self, l2_off: int) -> np.ndarray:
        img = self._img
        table = img.l2_cache.get(l2_off)
        if table is None:
            raw = self.backing.pread(img.cluster_size, l2_off)
            table = T.parse_l2(raw, img.extended_l2)
            img.l2_cache.put(l2_off, table, table.nbytes)
        return table

    def _classify(self, table: np.ndarray, first: int, count: int):
        img = self._img
        return T.classify(
            table, first, count,
            cluster_bits=img.cluster_bits, extended=img.extended_l2,
            zero_flag=img.version >= 3, data_file=img.has_data_file,
        )

    def _segments(self, offset: int, end: int, *, split_compressed: bool) -> Iterator[tuple[int, int, int, int, Any]]:
        """(start, stop, kind, host, aux) runs of the guest range, per L2 table.

        DATA: host is the host offset of ``start``.  COMPRESSED: aux is the L2 entry.
        """
        img = self._img
        ub = img.unit_bits
        unit = 1 << ub
        cb = img.cluster_bits
        pos = offset
        while pos < end:
            l1i = pos // img.l2_span
            tend = min(end, (l1i + 1) * img.l2_span)
            l2_off = self._l2_offset(l1i)
            if not l2_off:
                # skip the following unallocated L2 tables wholesale (one numpy search per L1 block)
                nxt = self._next_l1_allocated(l1i + 1)
                tend = min(end, nxt * img.l2_span)
                yield pos, tend, T.UNALLOCATED, 0, None
                pos = tend
                continue
            table = self._l2_table(l2_off)
            base = l1i * img.l2_span
            c0 = (pos - base) >> cb
            c1 = ((tend - base - 1) >> cb) + 1
            kind, host, cluster = self._classify(table, c0, c1 - c0)
            ubase = base + (c0 << cb)
            u_first = (pos - ubase) >> ub
            u_last = ((tend - ubase - 1) >> ub) + 1
            kind, host, cluster = kind[u_first:u_last], host[u_first:u_last], cluster[u_first:u_last]
            ubase += u_first << ub
            for a, b, k in T.runs(kind, host, cluster, unit, split_compressed=split_compressed):
                start = max(pos, ubase + (a << ub))
                stop = min(tend, ubase + (b << ub))
                if k == T.DATA:
                    yield start, stop, k, int(host[a]) + (start - ubase - (a << ub)), None
                elif k == T.COMPRESSED:
                    ci = int(cluster[a])
                    ent = table[ci, 0] if img.extended_l2 else table[ci]
                    yield start, stop, k, 0, int(ent)
                else:
                    yield start, stop, k, 0, None
            pos = tend

    # ------------------------------------------------------------------ reading

    def _readinto(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        compressed: list[tuple[int, int, int]] = []  # (guest start, guest stop, entry)
        for start, stop, kind, host, aux in self._segments(offset, end, split_compressed=True):
            view = buf[start - offset : stop - offset]
            if kind == T.DATA:
                self._read_data(view, host, start)
            elif kind == T.ZERO:
                _fill_zero(view)
            elif kind == T.UNALLOCATED:
                self._read_backing(view, start)
            else:
                compressed.append((start, stop, aux))
        if compressed:
            self._read_compressed(buf, offset, compressed)

    def _read_data(self, view: memoryview, host: int, guest: int) -> None:
        """A run contiguous on the host: one read of the data device (decrypted with LUKS)."""
        dev = self.data_dev
        n = len(view)
        if host >= dev.size:
            raise CorruptImageError(f"qcow2 data cluster at {host:#x} lies outside the {dev.size}-byte data file")
        if self._cipher is None:
            avail = min(n, dev.size - host)
            dev.readinto(view[:avail], host)
            if avail < n:
                _fill_zero(view[avail:])  # past the end of the file: zeroes, as qemu reads them
            return
        a = host & ~511
        b = (host + n + 511) & ~511
        tmp = bytearray(b - a)
        avail = min(len(tmp), dev.size - a)
        dev.readinto(memoryview(tmp)[:avail], a)
        # "Data encryption": LUKS IVs use the physical (host) sector, legacy AES the guest sector
        self._cipher.decrypt_into(memoryview(tmp), (a if self._img.iv_physical else guest - (host - a)) // 512)
        view[:] = memoryview(tmp)[host - a : host - a + n]

    def _read_backing(self, view: memoryview, start: int) -> None:
        """"Cluster mapping": unallocated -> the backing image, zeroes past its end or without one."""
        bimg = self.backing_image
        n = len(view)
        if bimg is None or start >= bimg.size:
            _fill_zero(view)
            return
        avail = min(n, bimg.size - start)
        bimg.readinto(view[:avail], start)
        if avail < n:
            _fill_zero(view[avail:])

    def _read_compressed(self, buf: memoryview, offset: int, items: list[tuple[int, int, int]]) -> None:
        """"Compressed Clusters Descriptor": batch neighbouring compressed data into one read,
        decompress on several threads when there are many clusters."""
        img = self._img
        cb = img.cluster_bits
        cs = img.cluster_size
        fsize = self.backing.size
        todo: list[tuple[int, int, int, int, int]] = []  # (guest start, guest stop, cluster guest base, host, nbytes)
        for start, stop, entry in items:
            base = (start >> cb) << cb
            cached = img.z_cache.get(base)
            if cached is not None and cached[0] == entry:
                buf[start - offset : stop - offset] = memoryview(cached[1])[start - base : stop - base]
                continue
            host, nbytes = T.compressed_extent(entry, cb)
            if host >= fsize:
                raise CorruptImageError(f"qcow2 compressed cluster at {host:#x} lies outside the file")
            nbytes = min(nbytes, fsize - host)
            todo.append((start, stop, base, host, nbytes, entry))
        if not todo:
            return
        # group into host-contiguous reads
        groups: list[list] = []
        for item in sorted(todo, key=lambda t: t[3]):
            if groups and item[3] <= groups[-1][1] + COMPRESSED_READ_GAP and item[3] + item[4] - groups[-1][0] <= 64 << 20:
                groups[-1][1] = max(groups[-1][1], item[3] + item[4])
                groups[-1][2].append(item)
            else:
                groups.append([item[3], item[3] + item[4], [item]])
        jobs = []
        for gstart, gend, members in groups:
            raw = bytearray(gend - gstart)
            self.backing.readinto(raw, gstart)
            mv = memoryview(raw)
            for start, stop, base, host, nbytes, entry in members:
                jobs.append((mv[host - gstart : host - gstart + nbytes], start, stop, base, entry))
        ctype = img.compression_type

        def work(job):
            data, start, stop, base, entry = job
            out = _decompress(data, cs, ctype)
            buf[start - offset : stop - offset] = memoryview(out)[start - base : stop - base]
            if stop - start < cs:
                img.z_cache.put(base, (entry, out), cs)

        if len(jobs) >= PARALLEL_DECOMPRESS_MIN:
            for fut in [_decompress_pool().submit(work, j) for j in jobs]:
                fut.result()
        else:
            for j in jobs:
                work(j)

    # ------------------------------------------------------------------ extents

    def _extents(self, length: int, offset: int) -> Iterator[Extent]:
        end = offset + length
        for start, stop, kind, _host, _aux in self._segments(offset, end, split_compressed=False):
            if kind in (T.DATA, T.COMPRESSED):
                yield Extent(start, stop - start, zero=False, hole=False)
            elif kind == T.ZERO:
                # as qemu-nbd reports it: nothing stored, reads as zeroes -> hole+zero
                yield Extent(start, stop - start, zero=True, hole=True)
            else:
                yield from self._backing_extents(start, stop)

    def _backing_extents(self, start: int, stop: int) -> Iterator[Extent]:
        """"unallocated -> backing": the backing image's allocation, holes past its end."""
        bimg = self.backing_image
        if bimg is not None and start < bimg.size:
            bend = min(stop, bimg.size)
            for ext in bimg.extents(bend - start, start):
                s, e = max(ext.start, start), min(ext.end, bend)
                if e > s:
                    yield Extent(s, e - s, ext.zero, ext.hole)
            start = bend
        if start < stop:
            yield Extent(start, stop - start, zero=True, hole=True)

    # ------------------------------------------------------------------ writing
    #
    # Crash safety ("Host cluster management"): new data is written and flushed before the
    # refcounts that claim its clusters, refcounts before the L2 entries that point to them,
    # L2 tables before the L1 entries that point to them; old clusters are released last.
    # A crash at any point leaves at worst leaked clusters (qemu-img check: leaks, no
    # corruption).  Refcounts are always kept exact, so the dirty bit is never needed.

    def _prepare_write(self) -> None:
        img = self._img
        if img.snapshots:
            raise UnsupportedFeatureError("writing to qcow2 images with internal snapshots is not supported")
        if img.crypt_method == H.CRYPT_AES:
            raise UnsupportedFeatureError("writing legacy AES-encrypted qcow2 images is not supported")
        if self.backing.readonly:
            raise ReadOnlyError("the qcow2 file is opened read-only")
        if img.has_data_file and self.data_dev.readonly:
            raise ReadOnlyError("the qcow2 external data file is opened read-only")
        cs = img.cluster_size
        raw = self.backing.pread(img.refcount_table_clusters * cs, img.refcount_table_offset)
        img.rt = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        bad = (img.rt & np.uint64(H.REFT_OFFSET_MASK)) % np.uint64(cs) != 0
        if bad.any():
            raise CorruptImageError(f"qcow2 refcount table entry {int(np.flatnonzero(bad)[0])} is unaligned")
        # "autoclear_features": we do not maintain bitmaps (or anything unknown), so their
        # consistency bits are cleared before the first write, as the spec requires.
        keep = img.autoclear & H.AUTOCLEAR_DATA_FILE_RAW
        if img.version >= 3 and img.autoclear != keep:
            self.backing.pwrite(keep.to_bytes(8, "big"), H.OFF_AUTOCLEAR_FEATURES)
            self.backing.flush()
            img.autoclear = keep
        img.rc_cache = T.LRUCache(4 * 1024 * 1024)
        img.rc_bits = 1 << img.refcount_order
        img.rc_per_block = cs * 8 // img.rc_bits
        img.alloc_next = -(-self.backing.size // cs)
        img.grow_devs = [self.backing]
        img.grow_data_devs = [self.data_dev]
        img.sync = True
        self.can_zero = True
        self.can_trim = True
        self.can_fast_zero = True

    # -- low-level helpers

    def _sync(self, *devs: BlockDevice) -> None:
        if self._img.sync:
            for d in devs or (self.backing,):
                d.flush()

    def _ensure_size(self, dev: BlockDevice, end: int) -> None:
        """Grow the file (and every handle's idea of its size) to at least ``end`` bytes."""
        if end <= dev.size:
            return
        if isinstance(dev, FileDevice):
            try:
                if os.fstat(dev.fd).st_size < end:
                    os.ftruncate(dev.fd, end)
            except OSError as exc:
                raise DeviceIOError(f"cannot grow the qcow2 file to {end} bytes: {exc.strerror}") from None
        elif hasattr(dev, "data") and isinstance(getattr(dev, "data"), bytearray):
            dev.data.extend(bytes(end - len(dev.data)))
        else:
            raise UnsupportedFeatureError(f"cannot grow a {dev.format_name} device holding a qcow2 image")
        group = self._img.grow_devs if dev is self.backing else self._img.grow_data_devs
        for d in group if dev in group else [dev]:
            d.size = max(d.size, end)

    def _write_at(self, dev: BlockDevice, data, offset: int) -> None:
        self._ensure_size(dev, offset + len(data))
        dev.pwrite(data, offset)

    # -- refcounts ("Host cluster management")

    def _rc_block(self, off: int) -> bytearray:
        img = self._img
        blk = img.rc_cache.get(off)
        if blk is None:
            if off + img.cluster_size > self.backing.size:
                raise CorruptImageError(f"qcow2 refcount block at {off:#x} lies outside the file")
            blk = bytearray(self.backing.pread(img.cluster_size, off))
            img.rc_cache.put(off, blk, len(blk))
        return blk

    def _rc_get_in(self, blk: bytearray, i: int) -> int:
        bits = self._img.rc_bits
        if bits >= 8:
            n = bits // 8
            return int.from_bytes(blk[i * n : (i + 1) * n], "big")
        per = 8 // bits
        return (blk[i // per] >> (bits * (i % per))) & ((1 << bits) - 1)

    def _rc_set_in(self, blk: bytearray, i: int, value: int) -> tuple[int, int]:
        bits = self._img.rc_bits
        if value < 0 or value >= 1 << bits:
            raise CorruptImageError(f"qcow2 refcount would become {value} (refcount_bits {bits})")
        if bits >= 8:
            n = bits // 8
            blk[i * n : (i + 1) * n] = value.to_bytes(n, "big")
            return i * n, (i + 1) * n
        per = 8 // bits
        shift = bits * (i % per)
        mask = ((1 << bits) - 1) << shift
        blk[i // per] = (blk[i // per] & ~mask) | (value << shift)
        return i // per, i // per + 1

    def _refcount(self, cluster: int) -> int:
        img = self._img
        j, i = divmod(cluster, img.rc_per_block)
        if j >= len(img.rt):
            return 0
        off = int(img.rt[j]) & H.REFT_OFFSET_MASK
        if not off:
            return 0
        return self._rc_get_in(self._rc_block(off), i)

    def _add_refcounts(self, clusters: list[int], delta: int) -> list[int]:
        """Add ``delta`` to each cluster's refcount; write each touched block's changed span once.
        Returns the clusters whose refcount dropped to 0."""
        img = self._img
        freed = []
        spans: dict[int, list[int]] = {}
        for c in clusters:
            j, i = divmod(c, img.rc_per_block)
            off = int(img.rt[j]) & H.REFT_OFFSET_MASK if j < len(img.rt) else 0
            if not off:
                raise CorruptImageError(f"qcow2 cluster {c} has no refcount block")
            blk = self._rc_block(off)
            value = self._rc_get_in(blk, i) + delta
            if value < 0:
                raise CorruptImageError(f"qcow2 refcount of cluster {c} would drop below zero")
            a, b = self._rc_set_in(blk, i, value)
            if value == 0:
                freed.append(c)
            span = spans.setdefault(off, [a, b])
            span[0], span[1] = min(span[0], a), max(span[1], b)
        for off, (a, b) in spans.items():
            blk = self._rc_block(off)
            self._write_at(self.backing, memoryview(blk)[a:b], off + a)
        return freed

    def _grow_refcount_table(self, need: int) -> None:
        """A larger refcount table at the end of the file, with refcount blocks for itself."""
        img = self._img
        cs = img.cluster_size
        per = img.rc_per_block
        old = img.rt
        entries = max(need + 1, 2 * len(old))
        start = img.alloc_next
        while True:
            s = -(-entries * 8 // cs)
            entries = s * cs // 8
            nb = 0
            while True:
                lo, hi = start, start + s + nb
                needed = [j for j in range(lo // per, (hi - 1) // per + 1) if j >= len(old) or not int(old[j])]
                if len(needed) <= nb:
                    break
                nb = len(needed)
            if not needed or needed[-1] < entries:
                break
            entries = needed[-1] + 1
        if s * cs > H.MAX_REFCOUNT_TABLE_BYTES:
            raise UnsupportedFeatureError("qcow2 refcount table would exceed 8 MiB")
        new = np.zeros(entries, dtype=np.uint64)
        new[: len(old)] = old
        region = range(start, start + s + nb)
        blocks = {j: start + s + k for k, j in enumerate(needed)}
        for j, c in blocks.items():
            blk = bytearray(cs)
            for cl in region:
                if cl // per == j:
                    self._rc_set_in(blk, cl - j * per, 1)
            self._write_at(self.backing, blk, c * cs)
            img.rc_cache.put(c * cs, blk, cs)
            new[j] = np.uint64(c * cs)
        self._sync()
        img.rt = new
        existing = [cl for cl in region if cl // per not in blocks]
        if existing:
            self._add_refcounts(existing, +1)
        table = new.astype(">u8").tobytes()
        self._write_at(self.backing, table, start * cs)
        self._sync()
        old_off, old_clusters = img.refcount_table_offset, img.refcount_table_clusters
        self.backing.pwrite(int(start * cs).to_bytes(8, "big") + s.to_bytes(4, "big"), H.OFF_REFCOUNT_TABLE_OFFSET)
        self._sync()
        img.refcount_table_offset, img.refcount_table_clusters = start * cs, s
        img.alloc_next = max(img.alloc_next, start + s + nb)
        self._release([old_off // cs + k for k in range(old_clusters)])

    def _reserve(self, n: int) -> int:
        """First of ``n`` contiguous free clusters at the end of the file, with refcount blocks
        in place (their refcounts still 0: the caller sets them after writing the clusters).
        Missing refcount blocks go right after the reserved run and count themselves."""
        img = self._img
        cs = img.cluster_size
        per = img.rc_per_block
        while True:
            start = img.alloc_next
            while any(self._refcount(c) for c in (start, start + n - 1)):
                start += n
            m = 0
            while True:
                lo, hi = start, start + n + m
                missing = [j for j in range(lo // per, (hi - 1) // per + 1) if j >= len(img.rt) or not int(img.rt[j])]
                if len(missing) <= m:
                    break
                m = len(missing)
            if missing and missing[-1] >= len(img.rt):
                self._grow_refcount_table(missing[-1])
                continue
            break
        if missing:
            blocks = {j: start + n + k for k, j in enumerate(missing)}
            contents = {j: bytearray(cs) for j in missing}
            existing = []
            for c in blocks.values():
                j = c // per
                if j in contents:
                    self._rc_set_in(contents[j], c - j * per, 1)
                else:
                    existing.append(c)
            for j, c in blocks.items():
                self._write_at(self.backing, contents[j], c * cs)
                img.rc_cache.put(c * cs, contents[j], cs)
            self._sync()
            if existing:
                self._add_refcounts(existing, +1)
                self._sync()
            # Publish table entries so that a block's own refcount is always reachable first:
            # a block counted in another new block waits for that block's entry (and a flush).
            todo = dict(blocks)
            while todo:
                ready = [j for j, c in todo.items() if c // per == j or c // per not in todo]
                for j in ready or list(todo):
                    c = todo.pop(j)
                    img.rt[j] = np.uint64(c * cs)
                    self.backing.pwrite(int(c * cs).to_bytes(8, "big"), img.refcount_table_offset + 8 * j)
                self._sync()
        img.alloc_next = max(img.alloc_next, start + n + len(missing))
        return start

    def _release(self, clusters: list[int]) -> None:
        """Drop one reference from each cluster; punch holes where nothing refers any more."""
        if not clusters:
            return
        cs = self._img.cluster_size
        freed = self._add_refcounts(clusters, -1)
        self._sync()
        for c in freed:
            if c * cs + cs <= self.backing.size:
                try:
                    self.backing.trim(cs, c * cs)
                except ImageFormatError:
                    pass

    def _old_clusters(self, entry: int) -> list[int]:
        """Host clusters an L2 entry holds a reference to (released when the entry is replaced)."""
        img = self._img
        cb = img.cluster_bits
        if entry & H.L2E_COMPRESSED:
            host, nbytes = T.compressed_extent(entry, cb)
            return list(range(host >> cb, ((host + nbytes - 1) >> cb) + 1))
        off = entry & H.L2E_OFFSET_MASK
        if off and not img.has_data_file:
            return [off >> cb]
        return []

    # -- L1 / L2 updates

    def _l2_for_update(self, l1i: int) -> tuple[np.ndarray, int, bool]:
        """(table, host offset, is_new) for L1 entry ``l1i``; a new table is all zeroes, not yet placed."""
        img = self._img
        off = self._l2_offset(l1i)
        if off:
            return self._l2_table(off), off, False
        shape = (img.l2_entries, 2) if img.extended_l2 else (img.l2_entries,)
        return np.zeros(shape, dtype=np.uint64), 0, True

    def _commit(self, updates: dict[int, dict[int, tuple[int, int]]], new_refs: list[int], release: list[int],
                data_synced: bool) -> None:
        """Apply L2 entry updates {l1 index: {l2 index: (entry, bitmap)}} in the safe order."""
        img = self._img
        cs = img.cluster_size
        tables = {}
        new_tables = [l1i for l1i in updates if not self._l2_offset(l1i)]
        if new_tables:
            first = self._reserve(len(new_tables))
            for k, l1i in enumerate(new_tables):
                new_refs.append(first + k)
        if not data_synced:
            self._sync(self.data_dev) if self.data_dev is not self.backing else self._sync()
        if new_refs:
            self._add_refcounts(new_refs, +1)
            self._sync()
        for l1i, ents in updates.items():
            table, off, is_new = self._l2_for_update(l1i)
            if is_new:
                off = (first + new_tables.index(l1i)) * cs
            lo, hi = min(ents), max(ents) + 1
            for i, (e, bm) in ents.items():
                if img.extended_l2:
                    table[i, 0] = np.uint64(e)
                    table[i, 1] = np.uint64(bm)
                else:
                    table[i] = np.uint64(e)
            if is_new:
                self._write_at(self.backing, table.astype(">u8").tobytes(), off)
                img.l2_cache.put(off, table, table.nbytes)
            else:
                esz = img.l2_entry_size
                self.backing.pwrite(table.reshape(-1)[lo * esz // 8 : hi * esz // 8].astype(">u8").tobytes(),
                                    off + lo * esz)
            tables[l1i] = (off, is_new)
        self._sync()
        if new_tables:
            for l1i in new_tables:
                off = tables[l1i][0]
                value = off | H.L1E_COPIED
                self.backing.pwrite(value.to_bytes(8, "big"), img.l1_offset + 8 * l1i)
                blk = self._l1_entry_block(l1i // L1_BLOCK_ENTRIES)
                blk[l1i % L1_BLOCK_ENTRIES] = np.uint64(value)
            self._sync()
        self._release(release)

    def _entry(self, l1i: int, i: int) -> tuple[int, int]:
        img = self._img
        off = self._l2_offset(l1i)
        if not off:
            return 0, 0
        t = self._l2_table(off)
        if img.extended_l2:
            return int(t[i, 0]), int(t[i, 1])
        return int(t[i]), 0

    # -- write / zero / trim

    def _guest_view(self, buf: memoryview, offset: int) -> None:
        """Current guest content (the COW source) of a range inside the virtual size; zeroes beyond."""
        n = max(0, min(len(buf), self.size - offset))
        if n:
            self._readinto(buf[:n], offset)
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        with self._img.lock:
            self._write_locked(buf, offset)

    def _write_locked(self, buf: memoryview, offset: int) -> None:
        img = self._img
        cs = img.cluster_size
        cb = img.cluster_bits
        end = offset + len(buf)
        enc = self._cipher is not None
        sub = cs // 32 if img.extended_l2 else cs
        # plan: (guest cluster base, region start, region end within cluster, action, old entry, bitmap)
        plans = []
        pos = offset
        while pos < end:
            gbase = pos & ~(cs - 1)
            a, b = pos - gbase, min(end, gbase + cs) - gbase
            l1i, i = divmod(gbase, img.l2_span)
            i >>= cb
            e, bm = self._entry(l1i, i)
            comp = bool(e & H.L2E_COMPRESSED)
            host = e & H.L2E_OFFSET_MASK
            has_host = (host != 0 or (img.has_data_file and e & H.L2E_COPIED)) and not comp
            inplace = has_host and bool(e & H.L2E_COPIED) and not (not img.extended_l2 and e & H.L2E_ZERO)
            plans.append((gbase, a, b, l1i, i, e, bm, comp, host if has_host else None, inplace))
            pos = gbase + b
        n_new = sum(1 for p in plans if not p[9] and not img.has_data_file)
        first = self._reserve(n_new) if n_new else 0
        k = 0
        updates: dict[int, dict[int, tuple[int, int]]] = {}
        release: list[int] = []
        new_refs: list[int] = []
        writes = []  # (host, bytes, guest)
        for gbase, a, b, l1i, i, e, bm, comp, host, inplace in plans:
            data = buf[gbase + a - offset : gbase + b - offset]
            if img.extended_l2 and not comp:
                sa, sb = a // sub, -(-b // sub)
                touched = ((1 << (sb - sa)) - 1) << sa
                alloc, zbits = bm & 0xFFFFFFFF, bm >> 32
                if inplace:
                    new_host = host
                    keep = touched
                else:
                    new_host = gbase if img.has_data_file else (first + k) * cs
                    if not img.has_data_file:
                        k += 1
                        new_refs.append(new_host >> cb)
                    keep = touched | alloc
                    release += self._old_clusters(e)
                # write every subcluster in ``keep``: runs of set bits
                bit = 0
                while bit < 32:
                    if not keep >> bit & 1:
                        bit += 1
                        continue
                    run = bit
                    while run < 32 and keep >> run & 1:
                        run += 1
                    ra, rb = bit * sub, run * sub
                    region = bytearray(rb - ra)
                    lo, hi = max(a, ra), min(b, rb)
                    if lo > ra or hi < rb or hi <= lo:
                        self._guest_view(memoryview(region), gbase + ra)
                    if hi > lo:
                        region[lo - ra : hi - ra] = data[lo - a : hi - a]
                    writes.append((new_host + ra, region, gbase + ra))
                    bit = run
                new_alloc = (alloc | keep) & 0xFFFFFFFF
                new_zero = zbits & ~new_alloc & 0xFFFFFFFF
                new_e = new_host | H.L2E_COPIED
                if (new_e, new_alloc | new_zero << 32) != (e, bm):
                    updates.setdefault(l1i, {})[i] = (new_e, new_alloc | (new_zero << 32))
                continue
            if inplace:
                ra, rb = a, b
                if enc:
                    ra, rb = a & ~511, (b + 511) & ~511
                if (ra, rb) == (a, b):
                    writes.append((host + a, data, gbase + a))
                else:
                    region = bytearray(rb - ra)
                    self._guest_view(memoryview(region), gbase + ra)
                    region[a - ra : b - ra] = data
                    writes.append((host + ra, region, gbase + ra))
                continue
            new_host = gbase if img.has_data_file else (first + k) * cs
            if not img.has_data_file:
                k += 1
                new_refs.append(new_host >> cb)
            if (a, b) == (0, cs):
                writes.append((new_host, data, gbase))
            else:
                region = bytearray(cs)
                self._guest_view(memoryview(region), gbase)
                region[a:b] = data
                writes.append((new_host, region, gbase))
            release += self._old_clusters(e)
            updates.setdefault(l1i, {})[i] = (new_host | H.L2E_COPIED, 0xFFFFFFFF if img.extended_l2 else 0)
        # 1. data (batched: contiguous host ranges become one write)
        self._write_data(writes)
        # 2.-4. refcounts, L2, L1, then release the old clusters
        if updates or new_refs:
            self._commit(updates, new_refs, release, data_synced=False)

    def _write_data(self, writes) -> None:
        dev = self.data_dev
        batch: list = []
        start = None
        guest0 = None

        def flush_batch():
            if not batch:
                return
            data = b"".join(bytes(x) if not isinstance(x, (bytes, bytearray)) else x for x in batch)
            if self._cipher is not None:
                data = bytearray(data)
                sector = (start if self._img.iv_physical else guest0) // 512
                self._cipher.encrypt_into(memoryview(data), sector)
            self._write_at(dev, data, start)

        pos = None
        for host, data, guest in sorted(writes, key=lambda w: w[0]):
            if pos is not None and host == pos and len(batch) < 256:
                batch.append(data)
                pos += len(data)
                continue
            flush_batch()
            batch, start, guest0, pos = [data], host, guest, host + len(data)
        flush_batch()

    def _zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        with self._img.lock:
            self._zero_locked(length, offset, fast, discard=False)

    def _trim(self, length: int, offset: int) -> None:
        with self._img.lock:
            self._zero_locked(length, offset, False, discard=True)

    def _zero_locked(self, length: int, offset: int, fast: bool, discard: bool) -> None:
        """Whole units become zero (v3) or unallocated (v2 without backing); partial ones are
        written with zeroes (zero) or left alone (trim, which is advisory)."""
        img = self._img
        cs = img.cluster_size
        cb = img.cluster_bits
        end = offset + length
        unit = cs // 32 if img.extended_l2 else cs
        ua = -(-offset // unit) * unit
        ub = end // unit * unit
        can_meta = img.version >= 3 or self.backing_image is None
        partial = [(offset, min(end, ua))] if ua > offset else []
        if ub < end and ub >= ua:
            partial.append((max(ub, offset), end))
        if ua >= ub:
            partial = [(offset, end)]
        if not discard and fast and (partial or not can_meta):
            raise NotFastError("qcow2 cannot zero this range without writing zeroes")
        if not can_meta:
            if not discard:
                self._write_zeroes(offset, length)
            return
        if img.data_file_raw and ua < ub:
            self.data_dev.zero(ub - ua, ua, may_trim=True)  # the raw data file stays a true image
        updates: dict[int, dict[int, tuple[int, int]]] = {}
        release: list[int] = []
        rewrite: list[tuple[int, int]] = []
        pos = ua
        while pos < ub:
            gbase = pos & ~(cs - 1)
            cend = min(ub, gbase + cs)
            l1i, i = divmod(gbase, img.l2_span)
            i >>= cb
            e, bm = self._entry(l1i, i)
            if img.extended_l2:
                sa, sb = (pos - gbase) // unit, (cend - gbase) // unit
                mask = ((1 << (sb - sa)) - 1) << sa
                if e & H.L2E_COMPRESSED:
                    if mask != 0xFFFFFFFF:
                        if not discard:
                            rewrite.append((pos, cend))
                        pos = cend
                        continue
                    release += self._old_clusters(e)
                    new_e, alloc, zbits = 0, 0, 0
                else:
                    new_e, alloc, zbits = e, bm & 0xFFFFFFFF, bm >> 32
                alloc &= ~mask
                zbits |= mask
                if alloc == 0 and (new_e & H.L2E_OFFSET_MASK or new_e & H.L2E_COPIED):
                    release += self._old_clusters(new_e)
                    new_e = 0
                if (new_e, alloc | zbits << 32) != (e, bm):
                    updates.setdefault(l1i, {})[i] = (new_e, alloc | (zbits << 32))
            else:
                if img.version >= 3:
                    new = H.L2E_ZERO
                else:
                    new = 0
                if e != new:
                    release += self._old_clusters(e)
                    updates.setdefault(l1i, {})[i] = (new, 0)
            pos = cend
        if updates:
            self._commit(updates, [], release, data_synced=True)
        if not discard:
            for a, b in partial + rewrite:
                if b > a:
                    self._write_zeroes(a, b - a)

    def _write_zeroes(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        zeros = bytes(min(chunk, length))
        pos = offset
        while pos < offset + length:
            n = min(chunk, offset + length - pos)
            self._write_locked(memoryview(zeros)[:n], pos)
            pos += n

    # ------------------------------------------------------------------ misc

    def flush(self) -> None:
        self._check_open()
        if not self.readonly:
            self.data_dev.flush()
            if self.data_dev is not self.backing:
                self.backing.flush()

    def clone(self) -> "Qcow2Device":
        self._check_open()
        dev = object.__new__(Qcow2Device)
        dev.__dict__.update(self.__dict__)
        dev._closed = False
        dev.backing = self.backing.clone()
        dev.data_dev = dev.backing if self.data_dev is self.backing else self.data_dev.clone()
        dev.backing_image = self.backing_image.clone() if self.backing_image is not None else None
        if self._cipher is not None:
            dev._cipher = _sector_cipher(*self._img.cipher_args)
        if not self.readonly:
            with self._img.lock:
                self._img.grow_devs.append(dev.backing)
                self._img.grow_data_devs.append(dev.data_dev)
        return dev

    def _close_children(self, close_backing: bool) -> None:
        if self.backing_image is not None:
            self.backing_image.close()
            self.backing_image = None
        if self.data_dev is not None and self.data_dev is not self.backing:
            self.data_dev.close()
        self.data_dev = None
        if close_backing and self.backing is not None:
            self.backing.close()

    def close(self) -> None:
        if not self._closed:
            try:
                if not self.readonly:
                    self.flush()
            finally:
                self._closed = True
                self._close_children(close_backing=True)

    def layer_info(self) -> dict[str, Any]:
        """What ``qemu-img info`` shows for this image."""
        img = self._img
        info: dict[str, Any] = {
            "virtual-size": self.size,
            "cluster-size": img.cluster_size,
            "compat": "0.10" if img.version == 2 else "1.1",
        }
        if img.version >= 3:
            info["compression-type"] = H.COMPRESSION_NAMES[img.compression_type]
            info["lazy-refcounts"] = img.lazy_refcounts
            info["refcount-bits"] = 1 << img.refcount_order
            info["extended-l2"] = img.extended_l2
            info["corrupt"] = img.corrupt
        if img.dirty:
            info["dirty-flag"] = True
        if img.backing_file is not None:
            info["backing-filename"] = img.backing_file
            if img.backing_format:
                info["backing-filename-format"] = img.backing_format
            chain = []
            dev = self.backing_image
            while dev is not None:
                entry = {"format": "raw" if dev.format_name == "file" else dev.format_name, "virtual-size": dev.size}
                path = _leaf_path(dev)
                if path:
                    entry["filename"] = path
                chain.append(entry)
                dev = getattr(dev, "backing_image", None)
            info["backing-chain"] = chain
        if img.has_data_file:
            info["data-file"] = img.data_file_name
            info["data-file-raw"] = img.data_file_raw
        if img.crypt_method:
            enc = {"format": "luks" if img.crypt_method == H.CRYPT_LUKS else "aes"}
            if getattr(img, "cipher_desc", None):
                enc["cipher"] = img.cipher_desc
            info["encrypt"] = enc
        if img.snapshots:
            info["snapshots"] = [
                {"id": s["id"], "name": s["name"], "vm-state-size": s["vm_state_size"], "date-sec": s["date_sec"],
                 "date-nsec": s["date_nsec"], "vm-clock-nsec": s["vm_clock_nsec"]}
                for s in img.snapshots
            ]
        if img.snapshot is not None:
            info["opened-snapshot"] = {"id": img.snapshot["id"], "name": img.snapshot["name"]}
        if img.bitmaps is not None:
            info["bitmaps"] = img.bitmaps.nb_bitmaps
        return info


_ZERO_CHUNK = memoryview(bytes(1 << 20))


def _fill_zero(view: memoryview) -> None:
    """Zero a buffer without allocating its size again."""
    for pos in range(0, len(view), len(_ZERO_CHUNK)):
        n = min(len(_ZERO_CHUNK), len(view) - pos)
        view[pos : pos + n] = _ZERO_CHUNK[:n]


def _sector_cipher(name: str, mode: str, key: bytes):
    from ..luks1.sectors import SectorCipher

    return SectorCipher(name, mode, key)


def _decompress(data: memoryview, cluster_size: int, ctype: int) -> bytes:
    """One compressed cluster -> exactly ``cluster_size`` bytes (bounded output; bombs are errors)."""
    try:
        if ctype == H.COMPRESSION_DEFLATE:
            # "compression_type" 0: raw deflate, no zlib header (qemu writes windowBits -12)
            d = _inflate_lib.decompressobj(-15)
            out = d.decompress(data, cluster_size)
        else:
            reader = zstandard.ZstdDecompressor().stream_reader(bytes(data), read_across_frames=False)
            parts = []
            got = 0
            while got < cluster_size:
                chunk = reader.read(cluster_size - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            out = b"".join(parts)
    except (*_INFLATE_ERRORS, zstandard.ZstdError) as exc:
        raise CorruptImageError(f"qcow2 compressed cluster does not decompress: {exc}") from None
    if len(out) != cluster_size:
        raise CorruptImageError(f"qcow2 compressed cluster decompresses to {len(out)} bytes, not {cluster_size}")
    return out


def open_qcow2(dev: BlockDevice, writable: bool, options: dict[str, Any]) -> Qcow2Device:
    """detect.Format opener."""
    return Qcow2Device(dev, writable=writable, options=options)


def probe_qcow2(head: bytes, dev: BlockDevice) -> bool:
    return head[:4] == H.MAGIC and len(head) >= 8 and int.from_bytes(head[4:8], "big") >= 2
