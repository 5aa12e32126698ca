"""``imageformats convert [-f FMT] [-O FMT] [-o OPTS] [-c] [-p] SRC DST``: sparse-aware conversion."""

from __future__ import annotations

import os

from .. import detect
from ..errors import InvalidArgumentError
from .common import Progress, add_secret_arguments, open_image, parse_options


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert an image to another format (holes stay holes)")
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("-f", "--format", help="force the source format stack (e.g. xz,qcow2)")
    p.add_argument("-O", "--output-format", default="raw", help="output format (default raw)")
    p.add_argument("-o", "--options", action="append", metavar="KEY=VALUE,...",
                   help="output format options (see docs/ for each format)")
    p.add_argument("-c", "--compress", action="store_true",
                   help="compress the output (passed to the output as the option compress=on)")
    p.add_argument("-p", "--progress", action="store_true", help="show progress")
    add_secret_arguments(p)
    from .luks import add_new_secret_arguments

    add_new_secret_arguments(p)  # the passphrase of an encrypted output (-O luks), read from a file
    p.set_defaults(func=run)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # the destination does not exist yet, or the source is a URL
        return False


def run(args) -> int:
    if _same_file(args.source, args.destination):
        # Writing the output would truncate the input before it is read.
        raise InvalidArgumentError(f"destination {args.destination} is the source image itself")
    output = detect.get_output(args.output_format)
    options = parse_options(args.options)
    if args.compress:
        options["compress"] = "on"
    from .luks import new_secret_from_args

    options.update(new_secret_from_args(args))  # {"new_passphrase": bytes} etc., never from -o
    progress = Progress(args.progress)
    with open_image(args, args.source, fmt=args.format) as src:
        output.write(src, args.destination, options, progress)
    progress.finish()
    return 0
