"""The nbdkit python plugin, run by Debian's real nbdkit (which embeds the system python3).

Oracles: the source file's bytes, qemu-img reading the image itself, qemu-img map.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from peers import qemu_extents_as_ours, qemu_img_map, run, sparse_file

IMAGEFORMATS = [sys.executable, "-m", "imageformats"]


def plugin() -> str:
    out = subprocess.run([*IMAGEFORMATS, "nbdkit-plugin"], capture_output=True, check=True, text=True)
    return out.stdout.strip()


def test_plugin_path_and_system_python_import():
    path = plugin()
    assert path.endswith("imageformats/nbd/nbdkit_plugin.py") and os.path.isfile(path)
    # The system python does not see the package by itself (it is installed for another python)...
    bare = subprocess.run(["/usr/bin/python3", "-c", "import imageformats"], capture_output=True,
                          cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert bare.returncode != 0
    # ...so the plugin adds its own package root; --check proves that works with the Debian deps.
    check = subprocess.run([*IMAGEFORMATS, "nbdkit-plugin", "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "ok: imageformats" in check.stderr


def test_nbdkit_reads_raw_and_maps(tmp_path, sparse_raw):
    out = tmp_path / "out.raw"
    sock = tmp_path / "sock"
    proc = run("nbdkit", "-U", sock, "python", plugin(), f"file={sparse_raw}",
               "--run", f'nbdcopy "$uri" {out} && nbdinfo --map --json "$uri"')
    assert out.read_bytes() == sparse_raw.read_bytes()
    theirs = []
    for e in json.loads(proc.stdout):
        item = (e["offset"], e["length"], bool(e["type"] & 2), bool(e["type"] & 1))
        if theirs and theirs[-1][0] + theirs[-1][1] == item[0] and theirs[-1][2:] == item[2:]:
            prev = theirs.pop()
            item = (prev[0], prev[1] + item[1], item[2], item[3])
        theirs.append(item)
    assert theirs == qemu_extents_as_ours(qemu_img_map(sparse_raw, "raw"))
    # read-only by default: nbdinfo --can write says no (exit 2)
    proc = run("nbdkit", "-U", tmp_path / "sock2", "python", plugin(), f"file={sparse_raw}",
               "--run", 'nbdinfo --can write "$uri"', check=False)
    assert proc.returncode == 2


def test_nbdkit_serves_qcow2_compared_by_qemu(tmp_path):
    raw = tmp_path / "d.raw"
    sparse_file(raw, 5 << 20, [(2 << 20, 200_000)])
    qcow = tmp_path / "d.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    run("nbdkit", "-U", tmp_path / "s", "python", plugin(), f"file={qcow}",
        "--run", f'qemu-img compare -f qcow2 -F raw {qcow} "$uri"')


def test_nbdkit_writable(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(1 << 20) + bytes(2 << 20) + os.urandom(4096))
    dst = tmp_path / "dst.raw"
    dst.write_bytes(os.urandom(src.stat().st_size))
    run("nbdkit", "-U", tmp_path / "s", "python", plugin(), f"file={dst}", "writable=true",
        "--run", f'nbdcopy {src} "$uri" && PATH=/usr/bin:$PATH nbdsh -u "$uri" -c "h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)"')
    want = bytearray(src.read_bytes())
    want[:4096] = bytes(4096)
    assert dst.read_bytes() == bytes(want)


def test_nbdkit_bad_file_reports_error(tmp_path):
    proc = run("nbdkit", "-U", tmp_path / "s", "python", plugin(), f"file={tmp_path}/missing.img",
               "--run", "true", check=False)
    assert proc.returncode != 0
    assert b"missing.img" in proc.stderr and b"no such file" in proc.stderr
    proc = run("nbdkit", "-U", tmp_path / "s2", "python", plugin(), "bogus=1", "--run", "true", check=False)
    assert proc.returncode != 0 and b"unknown parameter" in proc.stderr


def test_copied_plugin_finds_the_package_through_imageformats_path(tmp_path, sparse_raw):
    """A plugin file copied away from the package needs $IMAGEFORMATS_PATH (the documented mechanism)."""
    copied = tmp_path / "plugin.py"
    copied.write_text(open(plugin()).read())
    root = os.path.dirname(os.path.dirname(os.path.dirname(plugin())))
    proc = run("nbdkit", "-U", tmp_path / "a", "python", copied, f"file={sparse_raw}", "--run", "true", check=False)
    assert proc.returncode != 0 and b"No module named 'imageformats'" in proc.stderr
    out = tmp_path / "out.raw"
    run("nbdkit", "-U", tmp_path / "b", "python", copied, f"file={sparse_raw}", "--run", f'nbdcopy "$uri" {out}',
        env={"IMAGEFORMATS_PATH": root})
    assert out.read_bytes() == sparse_raw.read_bytes()
