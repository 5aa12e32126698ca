"""The `imageformats luks ...` commands: exit codes, secrets only from files, refusals, JSON dump."""

from __future__ import annotations

import json
import os

import pytest

from imageformats.cli import main as cli
from luks_tools import PASSPHRASE, cs_dump_fields, cs_format, cs_test_passphrase, hexstr, qemu_read, secret_file
from peers import run

MiB = 1 << 20


def sh(*args, check=False):
    return run("python3", "-m", "imageformats", *args, check=check)


@pytest.fixture
def vol(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "v.luks"
    assert cli(["luks", "format", str(img), "--size", "1M", "--pbkdf-force-iterations", "1000",
                "--new-passphrase-file", str(pw), "-q"]) == 0
    return img, pw


def test_no_secret_on_the_command_line(tmp_path):
    for argv in (["luks", "format", "x", "--passphrase", "abc"], ["luks", "add-key", "x", "--new-passphrase", "abc"],
                 ["luks", "change-key", "x", "--key", "abc"]):
        with pytest.raises(SystemExit) as exc:
            cli(argv)
        assert exc.value.code == 2
    # -o cannot carry one either
    raw = tmp_path / "a.raw"
    raw.write_bytes(bytes(4096))
    p = sh("convert", "-O", "luks", "-o", "new_passphrase=abc,iterations=1000", raw, tmp_path / "o.luks")
    assert p.returncode == 2 and b"unknown luks output option" in p.stderr and b"abc" not in p.stderr


def test_exit_codes(tmp_path, vol):
    img, pw = vol
    wrong = secret_file(tmp_path, b"not-it", "wrong")
    p = sh("luks", "dump", img, "--dump-volume-key", "--passphrase-file", wrong)
    assert p.returncode == 5 and b"not-it" not in p.stderr
    p = sh("luks", "add-key", img, "--passphrase-file", wrong, "--new-passphrase-file", pw)
    assert p.returncode == 5
    p = sh("luks", "dump", img, "--dump-volume-key")  # stdin is not a terminal: no prompt
    assert p.returncode == 5 and b"--passphrase-file" in p.stderr
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(8192))
    p = sh("luks", "dump", junk)
    assert p.returncode == 3 and b"not a LUKS" in p.stderr
    p = sh("luks", "format", tmp_path / "missing.img", "--new-passphrase-file", pw)
    assert p.returncode == 2 and b"--size" in p.stderr
    p = sh("luks", "remove-key", img, "--passphrase-file", pw)
    assert p.returncode == 2 and b"last active key slot" in p.stderr
    p = sh("convert", "-O", "luks", junk, tmp_path / "x.luks")
    assert p.returncode == 2 and b"--new-passphrase-file" in p.stderr
    assert cs_test_passphrase(img, pw)  # none of the failures wrote anything harmful


def test_dump_json_matches_cryptsetup(vol):
    img, pw = vol
    p = sh("luks", "dump", img, "--output", "json", check=True)
    doc = json.loads(p.stdout)
    f = cs_dump_fields(img)
    assert doc["uuid"] == f["UUID"] and doc["mk-iterations"] == int(f["MK iterations"])
    assert hexstr(bytes.fromhex(doc["mk-digest"])) == f["MK digest"]
    assert [s["enabled"] for s in doc["key-slots"]] == [f["slots"][i]["enabled"] for i in range(8)]
    p = sh("luks", "dump", img, "--output", "json", "--dump-volume-key", "--passphrase-file", pw, check=True)
    key = json.loads(p.stdout)["volume-key"]
    theirs = cs_dump_fields(img, "-q", "--dump-master-key", "--key-file", pw)["MK dump"]
    assert hexstr(bytes.fromhex(key)) == theirs


def test_key_files_with_offset_and_size(tmp_path, vol):
    img, pw = vol
    blob = secret_file(tmp_path, bytes(range(256)) * 4, "blob")
    assert cli(["luks", "add-key", str(img), "--passphrase-file", str(pw), "--new-key-file", str(blob),
                "--new-keyfile-offset", "10", "--new-keyfile-size", "32", "--pbkdf-force-iterations", "1000"]) == 0
    p = run("cryptsetup", "luksOpen", "--test-passphrase", "--key-file", blob, "--keyfile-offset", "10",
            "--keyfile-size", "32", img, check=False)
    assert p.returncode == 0
    assert not cs_test_passphrase(img, blob)  # the whole file is a different key
    assert sh("luks", "dump", img, "--dump-volume-key", "--key-file", blob, "--keyfile-offset", "10",
              "--keyfile-size", "32").returncode == 0
    # a passphrase file is read up to its first newline, like a typed passphrase
    nl = secret_file(tmp_path, PASSPHRASE + b"\nignored second line\n", "nl")
    assert sh("luks", "dump", img, "--dump-volume-key", "--passphrase-file", nl).returncode == 0


def test_format_options_and_convert(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "o.luks"
    assert cli(["luks", "format", str(img), "--size", "512K", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "128",
                "--hash", "sha512", "--pbkdf-force-iterations", "2000", "--uuid",
                "01234567-89ab-cdef-0123-456789abcdef", "--key-slot", "4", "--align-payload", "4096",
                "--new-passphrase-file", str(pw), "-q"]) == 0
    f = cs_dump_fields(img)
    assert (f["Cipher mode"], f["MK bits"], f["Hash spec"]) == ("cbc-essiv:sha256", "128", "sha512")
    assert f["Payload offset"] == "4096" and f["UUID"] == "01234567-89ab-cdef-0123-456789abcdef"
    assert f["slots"][4]["enabled"] and f["slots"][4]["Iterations"] == "2000"
    assert os.path.getsize(img) == 4096 * 512 + 512 * 1024
    assert cs_test_passphrase(img, pw)
    # iter-time: a PBKDF2 benchmark decides the counts
    img2 = tmp_path / "t.luks"
    raw = tmp_path / "d.raw"
    raw.write_bytes(os.urandom(64 * 1024))
    assert cli(["convert", "-O", "luks", "-o", "iter-time=20,cipher=aes-xts-plain64,key-size=256",
                "--new-passphrase-file", str(pw), str(raw), str(img2)]) == 0
    g = cs_dump_fields(img2)
    assert int(g["slots"][0]["Iterations"]) >= 1000 and int(g["MK iterations"]) >= 1000
    assert qemu_read(img2, pw, tmp_path / "q.raw") == raw.read_bytes()


def test_header_backup_restore_refusals(tmp_path, vol):
    img, pw = vol
    bk = tmp_path / "b.hdr"
    assert cli(["luks", "header-backup", str(img), "--header-backup-file", str(bk)]) == 0
    p = sh("luks", "header-backup", img, "--header-backup-file", bk)
    assert p.returncode == 2 and b"exists" in p.stderr
    other = tmp_path / "other.luks"
    cs_format(other, pw, "aes-cbc-essiv:sha256", 128, size=2 * MiB)
    p = sh("luks", "header-restore", other, "--header-backup-file", bk)
    assert p.returncode == 2 and b"differs" in p.stderr
    junk = tmp_path / "junk.hdr"
    junk.write_bytes(bytes(8192))
    p = sh("luks", "header-restore", img, "--header-backup-file", junk)
    assert p.returncode == 2
    assert cs_test_passphrase(img, pw) and cs_test_passphrase(other, pw)


def test_uuid_and_kill_slot_cli(tmp_path, vol):
    img, pw = vol
    p = sh("luks", "uuid", img, check=True)
    assert p.stdout.decode().strip() == cs_dump_fields(img)["UUID"]
    assert sh("luks", "uuid", img, "--uuid", "not-a-uuid").returncode == 2
    p = sh("luks", "uuid", img, "--new-uuid", check=True)
    assert cs_dump_fields(img)["UUID"] == p.stdout.decode().strip()
    p = sh("luks", "kill-slot", img, "0")
    assert p.returncode == 5 and b"--passphrase-file" in p.stderr  # no secret given and not --force
    p = sh("luks", "kill-slot", img, "0", "--passphrase-file", pw)
    assert p.returncode == 2 and b"last active key slot" in p.stderr
    p = sh("luks", "kill-slot", img, "0", "--force", check=True)
    assert not cs_dump_fields(img)["slots"][0]["enabled"]


def test_key_files_are_bounded(tmp_path, vol):
    """A key file is read whole only up to 8 MiB (cryptsetup's limit): /dev/zero is an error, not a hang."""
    img, pw = vol
    p = sh("luks", "dump", img, "--dump-volume-key", "--key-file", "/dev/zero")
    assert p.returncode == 2 and b"larger than" in p.stderr
    # with --keyfile-size only that many bytes are read: a zero key of 64 bytes opens nothing
    p = sh("luks", "dump", img, "--dump-volume-key", "--key-file", "/dev/zero", "--keyfile-size", "64")
    assert p.returncode == 5


def test_format_refuses_to_overwrite_a_luks_header_without_batch_mode(tmp_path, vol):
    img, pw = vol
    before = img.read_bytes()[:4096]
    p = sh("luks", "format", img, "--pbkdf-force-iterations", "1000", "--new-passphrase-file", pw)
    assert p.returncode == 2 and b"already holds a LUKS header" in p.stderr
    assert img.read_bytes()[:4096] == before
    p = sh("luks", "format", img, "--size", "64K", "--pbkdf-force-iterations", "1000", "--new-passphrase-file", pw)
    assert p.returncode == 2 and img.read_bytes()[:4096] == before and cs_test_passphrase(img, pw)
    assert sh("luks", "format", img, "-q", "--pbkdf-force-iterations", "1000", "--new-passphrase-file", pw,
              "--uuid", "11111111-2222-3333-4444-555555555555").returncode == 0
    assert cs_dump_fields(img)["UUID"] == "11111111-2222-3333-4444-555555555555"

