"""The ``imageformats`` command on raw files and sparse-random, against qemu-img, dd, gzip and cmp."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys

import pytest

from peers import qemu_extents_as_ours, qemu_img_map, run

from imageformats.cli import common
from imageformats.errors import InvalidArgumentError, NotFoundError
from imageformats.testing.sparse_random import SparseRandomDevice

MiB = 1 << 20


def cli(*args, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "imageformats", *map(str, args)], input=input,
                          capture_output=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"imageformats {' '.join(map(str, args))} exited {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def our_map(path) -> list[tuple[int, int, bool, bool]]:
    doc = json.loads(cli("map", "--output", "json", path).stdout)
    for entry in doc:
        assert set(entry) == {"start", "length", "zero", "hole"}
    return [(e["start"], e["length"], e["zero"], e["hole"]) for e in doc]


@pytest.fixture
def zeros_raw(sparse_raw):
    """The conftest sparse file plus an allocated run of zero bytes (data to qemu-img, not a hole)."""
    run("dd", "if=/dev/zero", f"of={sparse_raw}", "bs=64K", "count=2", "seek=64", "conv=notrunc", "status=none")
    return sparse_raw


def test_console_script_is_installed(sparse_raw):
    proc = subprocess.run(["imageformats", "info", "--output", "json", str(sparse_raw)], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["virtual-size"] == 16 * MiB


def test_map_json_equals_qemu_img_map(zeros_raw):
    ours = our_map(zeros_raw)
    theirs = qemu_extents_as_ours(qemu_img_map(zeros_raw, "raw"))
    assert ours == theirs
    assert (4 * MiB, 128 * 1024, False, False) in ours  # allocated zeroes are data, as qemu-img says
    assert ours[0] == (0, MiB, True, True) and ours[-1][0] + ours[-1][1] == 16 * MiB


def test_map_human(sparse_raw):
    out = cli("map", sparse_raw).stdout.decode().splitlines()
    assert out[0].split() == ["Offset", "Length", "Type"]
    rows = [line.split() for line in out[1:]]
    assert rows[0] == ["0x0", "0x100000", "hole"] and rows[1] == ["0x100000", "0x10000", "data"]


def test_info_json_matches_qemu_img_info(sparse_raw):
    ours = json.loads(cli("info", "--output", "json", sparse_raw).stdout)
    theirs = json.loads(run("qemu-img", "info", "--output=json", "-f", "raw", sparse_raw).stdout)
    assert ours["virtual-size"] == theirs["virtual-size"] == 16 * MiB
    assert ours["format"] == theirs["format"] == "raw"
    assert ours["layers"][-1]["disk-size"] == theirs["actual-size"]
    human = cli("info", sparse_raw).stdout.decode()
    assert "virtual size: 16 MiB (16777216 bytes)" in human


@pytest.mark.parametrize("offset,count", [("0", None), ("1048000", "70000"), ("1M", "64K"), ("8388607", "3"),
                                          ("16777215", None), ("9M", "100M")])
def test_cat_range_equals_dd(sparse_raw, offset, count):
    args = ["cat", sparse_raw, offset] + ([count] if count else [])
    ours = cli(*args).stdout
    off = common.parse_size(offset)
    dd = ["dd", f"if={sparse_raw}", "iflag=skip_bytes,count_bytes", f"skip={off}", "bs=1M", "status=none"]
    if count:
        dd.append(f"count={common.parse_size(count)}")
    assert ours == run(*dd).stdout


def test_cat_gzip_decompresses_to_the_raw(sparse_raw):
    compressed = cli("cat", "--gzip", sparse_raw).stdout
    assert compressed[:2] == b"\x1f\x8b"
    assert len(compressed) < 2 * MiB  # holes compress to almost nothing
    assert run("gzip", "-dc", input=compressed).stdout == sparse_raw.read_bytes()
    part = cli("cat", "--gzip", "-l", "1", sparse_raw, "1M", "65537").stdout
    assert run("gzip", "-dc", input=part).stdout == sparse_raw.read_bytes()[MiB : MiB + 65537]


def test_convert_keeps_holes(zeros_raw, tmp_path):
    out = tmp_path / "out.raw"
    proc = cli("convert", "-p", "-O", "raw", zeros_raw, out)
    assert b"100.00/100%" in proc.stderr
    run("cmp", zeros_raw, out)
    src_map = qemu_extents_as_ours(qemu_img_map(zeros_raw, "raw"))
    out_map = qemu_extents_as_ours(qemu_img_map(out, "raw"))
    # Holes stay holes; the allocated zeroes become a hole too (zero regions are not written).
    expected = [e if e[0] != 4 * MiB else (4 * MiB, 128 * 1024, True, True) for e in src_map]
    merged = []
    for e in expected:
        if merged and merged[-1][2:] == e[2:] and merged[-1][0] + merged[-1][1] == e[0]:
            e = (merged[-1][0], merged[-1][1] + e[1], *e[2:])
            merged.pop()
        merged.append(e)
    assert out_map == merged
    assert os.stat(out).st_blocks * 512 <= 2 * MiB


def test_sparse_random_source(tmp_path):
    url = "sparse-random://256M?seed=12&percent=3&runlength=1M"
    ref = SparseRandomDevice(256 * MiB, seed=12, percent=3, runlength=MiB)
    ours = our_map(url)
    assert ours == [(e.start, e.length, e.zero, e.hole) for e in ref.extents(ref.size, 0)]
    info = json.loads(cli("info", "--output", "json", url).stdout)
    assert info["virtual-size"] == 256 * MiB and info["layers"][0]["seed"] == 12
    out = tmp_path / "sr.raw"
    cli("convert", url, out)
    assert qemu_extents_as_ours(qemu_img_map(out, "raw")) == ours
    s, e = next(ref.islands())
    assert cli("cat", url, s, e - s).stdout == ref.pread(e - s, s)
    with open(out, "rb") as f:
        f.seek(s)
        assert f.read(e - s) == ref.pread(e - s, s)


def test_user_errors_one_line_distinct_codes(sparse_raw, tmp_path):
    cases = {
        "missing file": ["info", tmp_path / "missing.raw"],
        "offset past the end": ["cat", sparse_raw, "17M"],
        "unknown output format": ["convert", "-O", "nosuchformat", sparse_raw, tmp_path / "x"],
    }
    codes = {}
    for what, args in cases.items():
        proc = cli(*args, check=False)
        err = proc.stderr.decode()
        assert proc.returncode not in (0, 1), f"{what}: exit {proc.returncode}"
        assert err.count("\n") == 1 and err.startswith("imageformats: error: "), f"{what}: {err!r}"
        assert "Traceback" not in err and proc.stdout == b""
        codes[what] = proc.returncode
    assert len(set(codes.values())) == len(codes), codes
    assert codes["missing file"] == NotFoundError.exit_code
    assert codes["unknown output format"] == InvalidArgumentError.exit_code
    assert not (tmp_path / "x").exists()


def test_passphrase_file_and_stdin_are_accepted_and_never_echoed(sparse_raw, tmp_path):
    secret = b"correct horse battery staple"
    pf = tmp_path / "pass"
    pf.write_bytes(secret + b"\n")
    for args, stdin in (([f"--passphrase-file={pf}"], None), (["--passphrase-file", "-"], secret + b"\n")):
        proc = cli("info", *args, sparse_raw, input=stdin)
        assert secret not in proc.stdout + proc.stderr
        assert b"virtual size" in proc.stdout


# -- common helpers ----------------------------------------------------------------------------------


def test_read_passphrase_file(tmp_path, monkeypatch):
    f = tmp_path / "p"
    for content, want in [(b"secret\n", b"secret"), (b"secret", b"secret"), (b"se cret\r\nsecond line\n", b"se cret"),
                          (b"\n", b""), (b"\xff\xfe binary\nx", b"\xff\xfe binary")]:
        f.write_bytes(content)
        assert common.read_passphrase_file(str(f)) == want
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\nrest")))
    assert common.read_passphrase_file("-") == b"from stdin"
    with pytest.raises(NotFoundError):
        common.read_passphrase_file(str(tmp_path / "none"))


def test_read_key_file(tmp_path, monkeypatch):
    f = tmp_path / "k"
    key = bytes(range(256)) + b"\n\n"
    f.write_bytes(key)
    assert common.read_key_file(str(f)) == key  # whole and binary, newlines included
    assert common.read_key_file(str(f), 10) == key[10:]
    assert common.read_key_file(str(f), 10, 32) == key[10:42]
    with pytest.raises(InvalidArgumentError):
        common.read_key_file(str(f), 250, 32)
    with pytest.raises(InvalidArgumentError):
        common.read_key_file(str(f), -1)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(key)))
    assert common.read_key_file("-", 0, 4) == key[:4]


def test_secrets_from_args(tmp_path):
    (tmp_path / "p").write_bytes(b"pw\n")
    (tmp_path / "k").write_bytes(b"KEYKEYKEY")
    (tmp_path / "v").write_bytes(b"\x01" * 32)
    ns = argparse.Namespace(passphrase_file=str(tmp_path / "p"), key_file=str(tmp_path / "k"), keyfile_offset=3,
                            keyfile_size=3, volume_key_file=str(tmp_path / "v"), key_slot=2)
    assert common.secrets_from_args(ns) == {"passphrase": b"pw", "key_file": b"KEY", "volume_key": b"\x01" * 32,
                                            "key_slot": 2}
    empty = argparse.Namespace(passphrase_file=None, key_file=None, keyfile_offset=0, keyfile_size=None,
                               volume_key_file=None, key_slot=None)
    assert common.secrets_from_args(empty) == {}


def test_parse_size_and_options():
    assert common.parse_size("4096") == 4096
    assert common.parse_size("1K") == 1024 and common.parse_size("2MiB") == 2 * MiB
    assert common.parse_size("1.5G") == 3 << 29 and common.parse_size("1T") == 1 << 40
    for bad in ["", "-1", "1X", "0.3", "ten"]:
        with pytest.raises(InvalidArgumentError):
            common.parse_size(bad)
    assert common.parse_options(["a=1,b-c=2", "d="]) == {"a": "1", "b_c": "2", "d": ""}
    with pytest.raises(InvalidArgumentError):
        common.parse_options(["novalue"])


def test_each_command_module_registers_the_command_named_after_it():
    # build_parser(argv) imports only the module named like the command: that convention must hold.
    from imageformats import cli as cli_pkg

    for module in cli_pkg.COMMAND_MODULES:
        name = cli_pkg.command_name(module)
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command")
        __import__(module, fromlist=["register"]).register(sub)
        assert list(sub.choices) == [name], module


def test_a_command_line_imports_only_its_command_module():
    # A fresh interpreter: `imageformats convert ...`'s parser holds convert alone, `--help`'s all.
    code = ("import sys; from imageformats import cli; "
            "p = cli.build_parser(sys.argv[1:]); "
            "print(sorted(p._subparsers._group_actions[0].choices)); "
            "print(sorted(m for m in sys.modules if m.startswith('imageformats.cli.')))")
    proc = subprocess.run([sys.executable, "-c", code, "--debug", "map", "x"], capture_output=True,
                          text=True, check=True)
    choices, modules = proc.stdout.splitlines()
    assert choices == "['map']"
    assert "imageformats.cli.serve" not in modules and "imageformats.cli.map" in modules
    proc = subprocess.run([sys.executable, "-c", code, "--help-me"], capture_output=True, text=True, check=True)
    from imageformats import cli as cli_pkg

    assert proc.stdout.splitlines()[0] == str(sorted(cli_pkg.command_name(m) for m in cli_pkg.COMMAND_MODULES))
