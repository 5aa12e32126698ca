"""An nbdkit python plugin (API_VERSION 2) serving any imageformats stack.

    nbdkit python "$(imageformats nbdkit-plugin)" file=disk.qcow2.xz
    nbdkit python PLUGIN file=disk.img passphrase-file=/run/secret writable=true

Keys: ``file=`` (path or http(s) URL, required), ``format=`` (force the stack,
e.g. ``xz,qcow2``), ``passphrase-file=``, ``key-file=``, ``volume-key-file=``,
``key-slot=``, ``writable=`` (true/false; nbdkit ``-r`` still forces read-only).

nbdkit's python plugin embeds the *system* python3 (Debian: /usr/bin/python3),
not the interpreter imageformats was installed into.  This file therefore
appends the directory holding the ``imageformats`` package it belongs to (found
from its own path) to ``sys.path``, or ``$IMAGEFORMATS_PATH`` when set; the
runtime dependencies must be importable by the system python (Debian packages
python3-cryptography python3-construct python3-zstandard python3-numpy
python3-crcmod, see scripts/install-peers.sh).  ``imageformats nbdkit-plugin
--check`` verifies that.

Callbacks map onto the BlockDevice contract ("nbdkit-python-plugin(3)"):
pread->readinto, pwrite->pwrite(fua), zero->zero(may_trim, fast), trim, flush,
extents (EXTENT_HOLE/EXTENT_ZERO), block_size, can_*; thread model PARALLEL with
per-request device clones (or one device under a lock when it cannot be cloned,
or when it is writable and its clones would not share a cache).
"""

import errno
import os
import sys
import threading

API_VERSION = 2


def _package_root():
    env = os.environ.get("IMAGEFORMATS_PATH")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))  # .../imageformats/nbd
    return os.path.dirname(os.path.dirname(here))


def _system_site_dirs():
    """Debian's dist-packages for the running libpython's version.

    The embedded interpreter finds its prefix through the first ``python3`` on
    PATH; under pyenv or a venv that is another installation, whose sys.path
    lacks the Debian packages built for the libpython nbdkit actually loaded.
    """
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return [d for d in (f"/usr/local/lib/python{ver}/dist-packages", "/usr/lib/python3/dist-packages",
                        f"/usr/lib/python{ver}/dist-packages") if os.path.isdir(d)]


def _use_matching_stdlib():
    """Point sys.path at the stdlib of the libpython nbdkit loaded, when PATH led elsewhere.

    nbdkit's python plugin links the system libpython, but the interpreter takes
    its prefix from the first ``python3`` on PATH (a pyenv or venv python), whose
    stdlib and extension modules (``_ssl``, ``_lzma``...) may not match.
    """
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            libs = {line.split()[-1] for line in f if "/libpython3" in line}
    except OSError:
        return
    prefixes = {lib.split("/lib/")[0] or "/" for lib in libs if "/lib/" in lib}
    if len(prefixes) != 1:
        return
    (prefix,) = prefixes
    if os.path.realpath(sys.prefix) == os.path.realpath(prefix):
        return
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    std = [f"{prefix}/lib/python{ver}", f"{prefix}/lib/python{ver}/lib-dynload"]
    if not all(os.path.isdir(d) for d in std):
        return
    wrong = os.path.realpath(sys.prefix)
    sys.path[:] = std + [p for p in sys.path if not os.path.realpath(p or ".").startswith(wrong + os.sep)]


_use_matching_stdlib()
_ROOT = _package_root()
for _dir in [*_system_site_dirs(), _ROOT]:
    if _dir not in sys.path:
        # Appended, so the system python's own (Debian) packages win over anything else there.
        sys.path.append(_dir)

import nbdkit  # noqa: E402  (provided by nbdkit's python plugin)

import imageformats  # noqa: E402
from imageformats.errors import ImageFormatError, NotFastError  # noqa: E402

_config = {}
_device = None
_lock = threading.Lock()
_shared = False
_KEYS = ("file", "format", "passphrase-file", "key-file", "volume-key-file", "key-slot", "writable")


def _truthy(value):
    return value.strip().lower() in ("1", "true", "yes", "on")


def config(key, value):
    if key not in _KEYS:
        raise ValueError(f"unknown parameter {key!r} (known: {', '.join(_KEYS)})")
    _config[key] = value


def config_complete():
    if "file" not in _config:
        raise ValueError("file=PATH is required")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def _secret_options():
    from imageformats.cli.common import read_key_file, read_passphrase_file

    opts = {}
    if "passphrase-file" in _config:
        opts["passphrase"] = read_passphrase_file(_config["passphrase-file"])
    if "key-file" in _config:
        opts["key_file"] = read_key_file(_config["key-file"])
    if "volume-key-file" in _config:
        with open(_config["volume-key-file"], "rb") as f:
            opts["volume_key"] = f.read()
    if "key-slot" in _config:
        opts["key_slot"] = int(_config["key-slot"])
    return opts


def get_ready():
    global _device, _shared
    writable = _truthy(_config.get("writable", "false"))
    try:
        _device = imageformats.open(_config["file"], format=_config.get("format"), writable=writable,
                                    **_secret_options())
    except ImageFormatError as exc:
        # The message names the problem and never holds a secret.
        raise RuntimeError(f"{_config['file']}: {exc}") from None
    _shared = not _device.readonly and not _device.can_multi_conn


def cleanup():
    if _device is not None:
        _device.close()


class _Handle:
    """One client connection: a pool of device clones, one per request in flight."""

    def __init__(self, readonly):
        self.readonly = readonly or _device.readonly
        self.free = []
        self.all = []
        self.lock = threading.Lock()

    def run(self, fn):
        global _shared
        if _shared:
            with _lock:
                return fn(_device)
        with self.lock:
            dev = self.free.pop() if self.free else None
        if dev is None:
            try:
                dev = _device.clone()
            except ImageFormatError:  # this format cannot be cloned: one device, one at a time
                _shared = True
                with _lock:
                    return fn(_device)
            with self.lock:
                self.all.append(dev)
        try:
            return fn(dev)
        finally:
            with self.lock:
                self.free.append(dev)

    def close(self):
        with self.lock:
            for dev in self.all:
                dev.close()
            self.all.clear()
            self.free.clear()


def _call(h, fn):
    try:
        return h.run(fn)
    except NotFastError:
        nbdkit.set_error(errno.ENOTSUP)
        raise
    except ImageFormatError as exc:
        nbdkit.set_error(getattr(exc, "errno", errno.EIO))
        raise
    except OSError as exc:
        nbdkit.set_error(exc.errno or errno.EIO)
        raise


def open(readonly):
    return _Handle(readonly)


def close(h):
    h.close()


def get_size(h):
    return _device.size


def block_size(h):
    from imageformats.nbd.server import block_sizes

    return block_sizes(_device, 32 * 1024 * 1024)


def can_write(h):
    return not h.readonly


def can_flush(h):
    return True


def can_trim(h):
    return not h.readonly


def can_zero(h):
    return not h.readonly


def can_fast_zero(h):
    return not h.readonly


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_extents(h):
    return bool(_device.can_extents)


def can_multi_conn(h):
    return h.readonly or bool(_device.can_multi_conn)


def pread(h, buf, offset, flags):
    _call(h, lambda d: d.readinto(buf, offset))


def pwrite(h, buf, offset, flags):
    fua = bool(flags & nbdkit.FLAG_FUA)
    _call(h, lambda d: d.pwrite(buf, offset, fua=fua))


def zero(h, count, offset, flags):
    may_trim = bool(flags & nbdkit.FLAG_MAY_TRIM)
    fast = bool(flags & nbdkit.FLAG_FAST_ZERO)
    fua = bool(flags & nbdkit.FLAG_FUA)

    def do(d):
        d.zero(count, offset, may_trim=may_trim, fast=fast)
        if fua:
            d.flush()

    _call(h, do)


def trim(h, count, offset, flags):
    fua = bool(flags & nbdkit.FLAG_FUA)

    def do(d):
        d.trim(count, offset)
        if fua:
            d.flush()

    _call(h, do)


def flush(h, flags):
    _call(h, lambda d: d.flush())


def extents(h, count, offset, flags):
    req_one = bool(flags & nbdkit.FLAG_REQ_ONE)
    end = offset + count

    def do(d):
        out = []
        for ext in d.extents(count, offset, req_one=req_one):
            start, stop = max(ext.start, offset), min(ext.end, end)
            if stop > start:
                kind = (nbdkit.EXTENT_HOLE if ext.hole else 0) | (nbdkit.EXTENT_ZERO if ext.zero else 0)
                out.append((start, stop - start, kind))
            if stop >= end:
                break
        return out

    return _call(h, do)
