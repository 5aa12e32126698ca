"""``partial-deflate IMG OUT [B0 B1 ...]``: gzip (or xz) an image keeping chosen ranges editable."""

from __future__ import annotations

import argparse
import os
import sys

from ..block import FileDevice
from ..errors import InvalidArgumentError
from . import run_command
from .common import Progress, parse_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="partial-deflate",
        description="Compress IMG into one gzip member (or one .xz) whose chosen ranges stay stored "
                    "(uncompressed) so gzip-patch can change them in place later.",
        epilog="Boundaries B0 B1 B2 ... split the input into ranges that alternate stored, compressed, stored, "
               "... starting with stored at B0 ([0, B0) is compressed); the range after the last boundary "
               "continues the alternation to EOF.  Sizes accept K/M/G suffixes (powers of 1024).")
    p.add_argument("image", help="input image (raw)")
    p.add_argument("output", help="output .gz (or .xz with --format xz)")
    p.add_argument("boundaries", nargs="*", help="range boundaries B0 B1 ... (bytes)")
    p.add_argument("--stored", action="append", default=[], metavar="START:END",
                   help="keep [START, END) stored (repeatable); everything else is compressed")
    p.add_argument("--partition", action="append", type=int, default=[], metavar="N",
                   help="keep partition N (GPT or MBR, read from the image) stored (repeatable)")
    p.add_argument("-l", "--level", type=int, default=None,
                   help="compression level (gzip: 0-9, default 6; xz: 0-9, default 6)")
    p.add_argument("--format", choices=["gzip", "xz"], default="gzip", help="output format (default gzip)")
    p.add_argument("--check", choices=["crc32", "crc64"], default="crc64", help="xz integrity check (default crc64)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="compression threads (default 2)")
    p.add_argument("-p", "--progress", action="store_true", help="show progress")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def _ranges(args, dev) -> list[tuple[int, int]]:
    from ..gzip_partial.partitions import partition_range
    from ..gzip_partial.writer import boundaries_to_stored

    stored = boundaries_to_stored([parse_size(b) for b in args.boundaries], dev.size)
    for item in args.stored:
        start, sep, end = item.partition(":")
        if not sep:
            raise InvalidArgumentError(f"--stored {item!r} is not START:END")
        s, e = parse_size(start), parse_size(end)
        if e < s:
            raise InvalidArgumentError(f"--stored {item}: END is before START")
        if e > dev.size:
            raise InvalidArgumentError(f"--stored {item} runs past the end of the {dev.size}-byte input")
        stored.append((s, e))
    for n in args.partition:
        stored.append(partition_range(dev, n))
    return stored


def run(args) -> int:
    if args.threads < 1:
        raise InvalidArgumentError("--threads must be at least 1")
    if os.path.abspath(args.image) == os.path.abspath(args.output):
        raise InvalidArgumentError("output must differ from the input")
    progress = Progress(args.progress)
    with FileDevice(args.image) as dev:
        stored = _ranges(args, dev)
        if args.format == "xz":
            from ..gzip_partial.xz_stored import write_xz

            write_xz(dev, args.output, stored, preset=6 if args.level is None else args.level,
                     check=args.check, threads=args.threads, progress=progress)
        else:
            from ..gzip_partial.writer import write_gzip

            write_gzip(dev, args.output, stored, level=6 if args.level is None else args.level,
                       threads=args.threads, progress=progress)
    progress.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(run, args, args.debug)


if __name__ == "__main__":
    sys.exit(main())
