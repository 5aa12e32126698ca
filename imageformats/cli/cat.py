"""``imageformats cat IMG [OFFSET [COUNT]] [--gzip]``: stream the guest view as raw to stdout.

Zero extents are produced without reading the image; ``--gzip`` compresses on
the fly (the preload streamer of seed 000: a resumable download of a qcow2 as
raw, where large empty areas compress to almost nothing).
"""

from __future__ import annotations

import zlib

from ..block import MiB
from ..errors import OutOfRangeError
from .common import add_secret_arguments, open_image, parse_size, stdout_binary

CHUNK = 4 * MiB


def register(sub) -> None:
    p = sub.add_parser("cat", help="write the guest disk (or a range of it) to stdout as raw")
    p.add_argument("image")
    p.add_argument("offset", nargs="?", default="0", help="first byte (default 0; suffixes K, M, G)")
    p.add_argument("count", nargs="?", default=None, help="bytes to write (default: to the end)")
    p.add_argument("-f", "--format", help="force the format stack (e.g. xz,qcow2)")
    p.add_argument("--gzip", action="store_true", help="gzip-compress the output on the fly")
    p.add_argument("-l", "--level", type=int, default=6, choices=range(1, 10), metavar="1-9",
                   help="gzip level (default 6)")
    add_secret_arguments(p)
    p.set_defaults(func=run)


def stream(dev, offset: int, count: int, write) -> None:
    """Call ``write`` with the guest bytes of ``[offset, offset+count)`` in order."""
    end = offset + count
    buf = bytearray(CHUNK)
    zeroes = bytes(CHUNK)
    pos = offset
    while pos < end:
        for ext in dev.extents(end - pos, pos):
            stop = min(ext.end, end)
            while pos < stop:
                n = min(CHUNK, stop - pos)
                if ext.zero:
                    write(memoryview(zeroes)[:n])
                else:
                    view = memoryview(buf)[:n]
                    dev.readinto(view, pos)
                    write(view)
                pos += n
            if pos >= end:
                break


def run(args) -> int:
    offset = parse_size(args.offset)
    with open_image(args, args.image, fmt=args.format) as dev:
        if offset > dev.size:
            raise OutOfRangeError(f"offset {offset} is past the end of the {dev.size}-byte image")
        count = dev.size - offset if args.count is None else parse_size(args.count)
        count = min(count, dev.size - offset)  # like the seed's streamer: a count past the end stops at it
        out = stdout_binary()
        if args.gzip:
            comp = zlib.compressobj(args.level, zlib.DEFLATED, 31)  # wbits 31: gzip wrapper
            stream(dev, offset, count, lambda b: out.write(comp.compress(b)))
            out.write(comp.flush())
        else:
            stream(dev, offset, count, out.write)
        out.flush()
    return 0
