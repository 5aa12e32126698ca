"""``imageformats nbdkit-plugin [--check]``: print the path of the nbdkit python plugin.

    nbdkit python "$(imageformats nbdkit-plugin)" file=disk.qcow2 --run 'nbdinfo $uri'

nbdkit's python plugin embeds the system python3; ``--check`` runs that
interpreter and reports whether it can import imageformats and its dependencies.
"""

from __future__ import annotations

import os
import subprocess
import sys

import imageformats

SYSTEM_PYTHON = "/usr/bin/python3"


def plugin_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(imageformats.__file__)), "nbd", "nbdkit_plugin.py")


def package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(imageformats.__file__)))


def register(sub) -> None:
    p = sub.add_parser("nbdkit-plugin", help="print the path of the nbdkit python plugin")
    p.add_argument("--check", action="store_true",
                   help=f"check that nbdkit's embedded python ({SYSTEM_PYTHON}) can import the package")
    p.add_argument("--python", default=SYSTEM_PYTHON, help="interpreter to check (default %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    print(plugin_path())
    if not args.check:
        return 0
    code = ("import sys; sys.path.append(sys.argv[1]); import imageformats, imageformats.detect as d; "
            "d.formats(); print('ok: imageformats', imageformats.__version__, 'on python', sys.version.split()[0])")
    proc = subprocess.run([args.python, "-c", code, package_root()], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"{args.python} cannot import imageformats: {last}", file=sys.stderr)
        print("install the dependencies for it: bash scripts/install-peers.sh", file=sys.stderr)
        return 1
    print(proc.stdout.strip(), file=sys.stderr)
    return 0
