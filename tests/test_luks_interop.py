"""LUKS1 interop with the real tools, both directions: cryptsetup, qemu-img, nbdkit's luks filter."""

from __future__ import annotations

import json
import random

import pytest

from imageformats import detect
from imageformats.block import FileDevice, MemoryDevice
from imageformats.cli import main as cli
from imageformats.errors import WrongPassphraseError
from imageformats.luks1 import LuksDevice, luks_format, read_header, unlock, unlock_detailed
from luks_tools import (
    PASSPHRASE,
    cs_dump,
    cs_dump_fields,
    cs_format,
    cs_test_passphrase,
    hexstr,
    nbdkit_read,
    nbdkit_write,
    qemu_create,
    qemu_read,
    qemu_write,
    random_bytes,
    secret_file,
)
from peers import run

MiB = 1 << 20


def _check_header_matches_dump(img, hdr):
    """Every field of our parsed header equals what cryptsetup luksDump prints."""
    f = cs_dump_fields(img)
    assert f["Version"] == "1"
    assert f["Cipher name"] == hdr.cipher_name
    assert f["Cipher mode"] == hdr.cipher_mode
    assert f["Hash spec"] == hdr.hash_spec
    assert int(f["Payload offset"]) == hdr.payload_offset
    assert int(f["MK bits"]) == hdr.key_bytes * 8
    assert f["MK digest"] == hexstr(hdr.mk_digest)
    assert f["MK salt"] == hexstr(hdr.mk_digest_salt)
    assert int(f["MK iterations"]) == hdr.mk_digest_iter
    assert f["UUID"] == hdr.uuid
    for s in hdr.key_slots:
        d = f["slots"][s.index]
        assert d["enabled"] == s.active
        if s.active:
            assert int(d["Iterations"]) == s.iterations
            assert d["Salt"] == hexstr(s.salt)
            assert int(d["Key material offset"]) == s.key_material_offset
            assert int(d["AF stripes"]) == s.stripes


# -- images made by cryptsetup, data written by qemu-img -----------------------------------

# (cipher spec, key bits, hash, qemu can write data into it)
CRYPTSETUP_MATRIX = [
    ("aes-xts-plain64", 512, "sha256", True),
    ("aes-xts-plain64", 256, "sha1", True),
    ("aes-xts-plain", 512, "ripemd160", True),
    ("aes-xts-essiv:sha256", 512, "sha256", True),
    ("aes-cbc-essiv:sha256", 256, "sha256", True),
    ("aes-cbc-essiv:sha256", 128, "sha512", True),
    ("aes-cbc-plain64", 128, "sha1", True),
    ("aes-cbc-plain", 256, "ripemd160", True),
    ("aes-cbc-plain64", 256, "sha384", True),
    # modes qemu cannot open: cryptsetup's key-slot encryption is the oracle for these
    ("aes-ecb", 256, "sha256", False),
    ("aes-cbc-plain64be", 256, "sha256", False),
    ("aes-cbc-null", 128, "sha1", False),
    ("aes-xts-plain64be", 512, "sha224", False),
]


@pytest.mark.parametrize("cipher,bits,hash_spec,qemu_data", CRYPTSETUP_MATRIX,
                         ids=[f"{c}-{b}-{h}" for c, b, h, _ in CRYPTSETUP_MATRIX])
def test_read_cryptsetup_image(tmp_path, cipher, bits, hash_spec, qemu_data):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "cs.luks"
    cs_format(img, pw, cipher, bits, hash_spec, size=3 * MiB)
    hdr, key = unlock(FileDevice(img), passphrase=PASSPHRASE)
    assert hdr.cipher_spec == cipher and hdr.key_bytes * 8 == bits and hdr.hash_spec == hash_spec
    _check_header_matches_dump(img, hdr)
    # the volume key we recovered is the one cryptsetup reports
    dump = cs_dump_fields(img, "-q", "--dump-master-key", "--key-file", pw)
    assert dump["MK dump"] == hexstr(key)
    if qemu_data:
        with FileDevice(img) as f:
            payload = f.size - hdr.payload_offset * 512
        raw = tmp_path / "data.raw"
        raw.write_bytes(random_bytes(payload, 1))
        qemu_write(img, pw, raw)
        with LuksDevice(FileDevice(img), passphrase=PASSPHRASE) as dev:
            assert dev.size == payload
            assert dev.pread(dev.size, 0) == raw.read_bytes()
            assert dev.pread(1000, 777) == raw.read_bytes()[777:1777]


def test_cryptsetup_several_slots_and_key_files(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    kf = secret_file(tmp_path, b"line one\nline two\n\x00\xff binary\n", "keyfile")
    big = secret_file(tmp_path, random_bytes(4096, 7), "bigkey")
    img = tmp_path / "multi.luks"
    cs_format(img, pw, size=3 * MiB)
    run("cryptsetup", "luksAddKey", "--type", "luks1", "-q", "--pbkdf-force-iterations", "1000", "--key-file", pw,
        "--key-slot", "5", img, kf)
    run("cryptsetup", "luksAddKey", "-q", "--pbkdf-force-iterations", "1000", "--key-file", pw,
        "--new-keyfile-offset", "100", "--new-keyfile-size", "64", "--key-slot", "2", img, big)
    dev = FileDevice(img)
    key0 = unlock_detailed(dev, passphrase=PASSPHRASE)
    assert key0[2] == 0
    hdr, key5, slot = unlock_detailed(dev, key_file=kf.read_bytes())
    assert slot == 5 and key5 == key0[1]
    hdr, key2, slot = unlock_detailed(dev, key_file=big.read_bytes()[100:164])
    assert slot == 2 and key2 == key0[1]
    assert hdr.active_slots() == [0, 2, 5]
    # a key file's trailing newline matters (whole-file semantics)
    with pytest.raises(WrongPassphraseError):
        unlock(dev, key_file=kf.read_bytes().rstrip(b"\n"))
    with pytest.raises(WrongPassphraseError):
        unlock(dev, passphrase=PASSPHRASE, key_slot=5)
    # the CLI's --keyfile-offset/--keyfile-size select the same bytes
    p = run("python3", "-m", "imageformats", "luks", "dump", img, "--dump-volume-key", "--key-file", big,
            "--keyfile-offset", "100", "--keyfile-size", "64", "--output", "json")
    assert bytes.fromhex(json.loads(p.stdout)["volume-key"]) == key0[1]
    dev.close()


# -- images made by qemu-img ---------------------------------------------------------------

QEMU_MATRIX = [
    dict(cipher_alg="aes-256", cipher_mode="xts", ivgen_alg="plain64", hash_alg="sha256"),
    dict(cipher_alg="aes-128", cipher_mode="xts", ivgen_alg="plain64", hash_alg="sha1"),
    dict(cipher_alg="aes-192", cipher_mode="xts", ivgen_alg="essiv", ivgen_hash_alg="sha256", hash_alg="sha512"),
    dict(cipher_alg="aes-128", cipher_mode="cbc", ivgen_alg="essiv", ivgen_hash_alg="sha256", hash_alg="ripemd160"),
    dict(cipher_alg="aes-256", cipher_mode="cbc", ivgen_alg="plain", hash_alg="sha256"),
]


@pytest.mark.parametrize("opts", QEMU_MATRIX, ids=["-".join(o.values()) for o in QEMU_MATRIX])
def test_read_qemu_image(tmp_path, opts):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "q.luks"
    qemu_create(img, pw, 2 * MiB, **opts)
    raw = tmp_path / "data.raw"
    raw.write_bytes(random_bytes(2 * MiB, 2))
    qemu_write(img, pw, raw)
    with detect.open(str(img), passphrase=PASSPHRASE) as dev:
        assert dev.format_name == "luks"
        assert dev.size == 2 * MiB
        assert dev.pread(dev.size, 0) == raw.read_bytes()
        _check_header_matches_dump(img, dev.header)


# -- images made by imageformats -------------------------------------------------------------

# (cipher, key bits, hash, qemu reads it, nbdkit reads it)
OURS_MATRIX = [
    ("aes-xts-plain64", 512, "sha256", True, True),
    ("aes-xts-plain64", 256, "sha1", True, True),
    ("aes-xts-plain", 256, "sha512", True, True),
    ("aes-xts-plain64", 512, "ripemd160", True, False),  # nbdkit's gnutls PBKDF2 lacks ripemd160
    ("aes-cbc-essiv:sha256", 256, "sha256", True, False),  # nbdkit 1.32 has no essiv
    ("aes-cbc-plain64", 128, "sha512", True, True),
    ("aes-cbc-plain", 256, "sha256", True, True),
    ("aes-ecb", 256, "sha256", False, False),
    ("aes-cbc-plain64be", 256, "sha1", False, False),
]


@pytest.mark.parametrize("cipher,bits,hash_spec,qemu_ok,nbdkit_ok", OURS_MATRIX,
                         ids=[f"{c}-{b}-{h}" for c, b, h, _, _ in OURS_MATRIX])
def test_ours_read_by_peers(tmp_path, cipher, bits, hash_spec, qemu_ok, nbdkit_ok):
    pw = secret_file(tmp_path, PASSPHRASE)
    wrong = secret_file(tmp_path, b"not the passphrase", "wrong")
    raw = tmp_path / "data.raw"
    data = random_bytes(MiB + 4096, 3)
    raw.write_bytes(data)
    img = tmp_path / "ours.luks"
    rc = cli(["convert", "-O", "luks", "-o", f"cipher={cipher},key-size={bits},hash={hash_spec},iterations=1000",
              "--new-passphrase-file", str(pw), str(raw), str(img)])
    assert rc == 0
    hdr = read_header(FileDevice(img))
    _check_header_matches_dump(img, hdr)
    # our dump is cryptsetup's, character for character
    ours = run("python3", "-m", "imageformats", "luks", "dump", img).stdout.decode()
    assert ours == cs_dump(img)
    assert cs_test_passphrase(img, pw)
    assert not cs_test_passphrase(img, wrong)
    if qemu_ok:
        assert qemu_read(img, pw, tmp_path / "q.raw")[: len(data)] == data
    if nbdkit_ok:
        assert nbdkit_read(img, pw, tmp_path / "n.raw") == data


def test_format_defaults_match_cryptsetup_layout(tmp_path):
    """Same defaults as cryptsetup luksFormat --type luks1: aes-xts-plain64, 512 bits, sha256, layout."""
    pw = secret_file(tmp_path, PASSPHRASE)
    ours = tmp_path / "ours.luks"
    theirs = tmp_path / "theirs.luks"
    cs_format(theirs, pw, size=3 * MiB, cipher="aes-xts-plain64", key_bits=None)
    assert cli(["luks", "format", str(ours), "--size", "1M", "--pbkdf-force-iterations", "1000",
                "--new-passphrase-file", str(pw), "-q"]) == 0
    a = cs_dump_fields(ours)
    b = cs_dump_fields(theirs)
    for key in ("Version", "Cipher name", "Cipher mode", "Hash spec", "Payload offset", "MK bits", "MK iterations"):
        assert a[key] == b[key], key
    for i in range(8):
        assert a["slots"][i]["enabled"] == b["slots"][i]["enabled"]
    assert a["slots"][0]["Key material offset"] == b["slots"][0]["Key material offset"]
    # the payload follows the header area at the same 1 MiB-aligned offset for every key size
    for bits in (128, 256):
        p1, p2 = tmp_path / f"o{bits}", tmp_path / f"t{bits}"
        cs_format(p2, pw, "aes-cbc-essiv:sha256", bits, size=3 * MiB)
        assert cli(["luks", "format", str(p1), "--size", "1M", "-c", "aes-cbc-essiv:sha256", "-s", str(bits),
                    "--pbkdf-force-iterations", "1000", "--new-passphrase-file", str(pw), "-q"]) == 0
        d1, d2 = read_header(FileDevice(p1)), read_header(FileDevice(p2))
        assert d1.payload_offset == d2.payload_offset
        assert [s.key_material_offset for s in d1.key_slots] == [s.key_material_offset for s in d2.key_slots]


def test_unaligned_writes_read_back_by_qemu_and_nbdkit(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "w.luks"
    cs_format(img, pw, size=4 * MiB)
    raw = tmp_path / "data.raw"
    model = bytearray(random_bytes(2 * MiB, 4))
    raw.write_bytes(model)
    qemu_write(img, pw, raw)
    rng = random.Random(5)
    with LuksDevice(FileDevice(img, writable=True), passphrase=PASSPHRASE, writable=True) as dev:
        for _ in range(60):
            length = rng.choice([1, 7, 511, 512, 513, 1000, 4096, 70000, 300000])
            offset = rng.randrange(0, dev.size - length)
            chunk = rng.randbytes(length)
            dev.pwrite(chunk, offset)
            model[offset : offset + length] = chunk
        dev.zero(12345, 99999)
        model[99999 : 99999 + 12345] = bytes(12345)
        dev.pwrite(b"end", dev.size - 3)
        model[-3:] = b"end"
        dev.flush()
        assert dev.pread(dev.size, 0) == model
    assert qemu_read(img, pw, tmp_path / "q.raw") == model
    assert nbdkit_read(img, pw, tmp_path / "n.raw") == model


def test_nbdkit_writes_we_read(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "n.luks"
    assert cli(["luks", "format", str(img), "--size", "2M", "--pbkdf-force-iterations", "1000",
                "--new-passphrase-file", str(pw), "-q"]) == 0
    raw = tmp_path / "data.raw"
    raw.write_bytes(random_bytes(2 * MiB, 6))
    nbdkit_write(img, pw, raw)
    with detect.open(str(img), passphrase=PASSPHRASE) as dev:
        assert dev.pread(dev.size, 0) == raw.read_bytes()


def test_convert_decrypts_to_raw(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "q.luks"
    cs_format(img, pw, "aes-cbc-essiv:sha256", 128, size=3 * MiB)
    raw = tmp_path / "data.raw"
    raw.write_bytes(random_bytes(2 * MiB, 8))
    qemu_write(img, pw, raw)
    out = tmp_path / "out.raw"
    assert cli(["convert", "--passphrase-file", str(pw), str(img), str(out)]) == 0
    assert out.read_bytes() == raw.read_bytes()


def test_odd_sized_source_is_padded(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    raw = tmp_path / "odd.raw"
    data = random_bytes(100_000, 9)
    raw.write_bytes(data)
    img = tmp_path / "odd.luks"
    assert cli(["convert", "-O", "luks", "-o", "iterations=1000", "--new-passphrase-file", str(pw),
                str(raw), str(img)]) == 0
    out = qemu_read(img, pw, tmp_path / "q.raw")
    assert len(out) == 100_352 and out == data + bytes(352)


# -- key management against cryptsetup ------------------------------------------------------


def test_key_management_both_ways(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    p1 = secret_file(tmp_path, b"second passphrase", "p1")
    p2 = secret_file(tmp_path, b"third passphrase", "p2")
    p3 = secret_file(tmp_path, b"changed by cryptsetup", "p3")
    img = tmp_path / "k.luks"
    assert cli(["luks", "format", str(img), "--size", "1M", "--pbkdf-force-iterations", "1000",
                "--new-passphrase-file", str(pw), "-q"]) == 0
    # our add-key -> cryptsetup accepts it
    assert cli(["luks", "add-key", str(img), "--passphrase-file", str(pw), "--new-passphrase-file", str(p1),
                "--pbkdf-force-iterations", "1000"]) == 0
    assert cs_test_passphrase(img, p1)
    assert cs_dump_fields(img)["slots"][1]["enabled"]
    # cryptsetup adds a key -> we open with it
    run("cryptsetup", "luksAddKey", "-q", "--pbkdf-force-iterations", "1000", "--key-file", pw, img, p2)
    assert unlock_detailed(FileDevice(img), passphrase=b"third passphrase")[2] == 2
    # our change-key: new works, old is gone, for cryptsetup too
    assert cli(["luks", "change-key", str(img), "--passphrase-file", str(p1), "--new-passphrase-file", str(p3),
                "--pbkdf-force-iterations", "1000"]) == 0
    assert cs_test_passphrase(img, p3)
    assert not cs_test_passphrase(img, p1)
    # our remove-key -> cryptsetup no longer accepts it
    assert cli(["luks", "remove-key", str(img), "--passphrase-file", str(p3)]) == 0
    assert not cs_test_passphrase(img, p3)
    # cryptsetup kills a slot -> we no longer open with it
    run("cryptsetup", "luksKillSlot", "-q", img, "2")
    with pytest.raises(WrongPassphraseError):
        unlock(FileDevice(img), passphrase=b"third passphrase")
    # our kill-slot with another slot's passphrase
    assert cli(["luks", "add-key", str(img), "--passphrase-file", str(pw), "--new-passphrase-file", str(p2),
                "--key-slot", "6", "--pbkdf-force-iterations", "1000"]) == 0
    assert cs_test_passphrase(img, p2, "--key-slot", "6")
    assert cli(["luks", "kill-slot", str(img), "6", "--passphrase-file", str(pw)]) == 0
    assert not cs_test_passphrase(img, p2)
    assert cs_test_passphrase(img, pw)
    assert [i for i, s in cs_dump_fields(img)["slots"].items() if s["enabled"]] == [0]
    # cryptsetup changes our key -> we open with the new one
    run("cryptsetup", "luksChangeKey", "-q", "--pbkdf-force-iterations", "1000", "--key-file", pw, img, p1)
    assert unlock(FileDevice(img), passphrase=b"second passphrase")[0].active_slots()


def test_header_backup_matches_cryptsetup_and_restores(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "h.luks"
    cs_format(img, pw, size=3 * MiB)
    ours = tmp_path / "ours.hdr"
    theirs = tmp_path / "theirs.hdr"
    assert cli(["luks", "header-backup", str(img), "--header-backup-file", str(ours)]) == 0
    run("cryptsetup", "luksHeaderBackup", img, "--header-backup-file", theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    # wreck the header; restoring cryptsetup's backup with our tool brings the volume back
    with open(img, "r+b") as f:
        f.write(bytes(4096))
    assert not cs_test_passphrase(img, pw)
    assert cli(["luks", "header-restore", str(img), "--header-backup-file", str(theirs)]) == 0
    assert cs_test_passphrase(img, pw)
    # and cryptsetup restores ours after a key change
    p1 = secret_file(tmp_path, b"other", "p1")
    run("cryptsetup", "luksChangeKey", "-q", "--pbkdf-force-iterations", "1000", "--key-file", pw, img, p1)
    assert not cs_test_passphrase(img, pw)
    run("cryptsetup", "luksHeaderRestore", "-q", img, "--header-backup-file", ours)
    assert cs_test_passphrase(img, pw)


def test_uuid_both_ways(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "u.luks"
    assert cli(["luks", "format", str(img), "--size", "1M", "--pbkdf-force-iterations", "1000",
                "--uuid", "12345678-1234-5678-1234-567812345678", "--new-passphrase-file", str(pw), "-q"]) == 0
    assert run("cryptsetup", "luksUUID", img).stdout.decode().strip() == "12345678-1234-5678-1234-567812345678"
    assert cli(["luks", "uuid", str(img), "--uuid", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"]) == 0
    assert run("cryptsetup", "luksUUID", img).stdout.decode().strip() == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    run("cryptsetup", "luksUUID", "-q", "--uuid", "0f0f0f0f-1111-2222-3333-444444444444", img)
    assert read_header(FileDevice(img)).uuid == "0f0f0f0f-1111-2222-3333-444444444444"
    assert cs_test_passphrase(img, pw)


def test_volume_key_dump_and_unlock(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "v.luks"
    cs_format(img, pw, size=3 * MiB)
    theirs = cs_dump(img, "-q", "--dump-master-key", "--key-file", pw)
    ours = run("python3", "-m", "imageformats", "luks", "dump", img, "--dump-volume-key",
               "--passphrase-file", pw).stdout.decode()
    assert ours == theirs
    key = bytes.fromhex(cs_dump_fields(img, "-q", "--dump-master-key", "--key-file", pw)["MK dump"].replace(" ", ""))
    with LuksDevice(FileDevice(img), volume_key=key) as dev:
        assert dev.size == MiB
    with pytest.raises(WrongPassphraseError):
        LuksDevice(FileDevice(img), volume_key=bytes(64))


def test_detached_header(tmp_path):
    """cryptsetup --header layout; payload ciphertext equals an attached volume with the same key."""
    pw = secret_file(tmp_path, PASSPHRASE)
    hdr_file = tmp_path / "hdr.img"
    data_file = tmp_path / "data.img"
    with open(hdr_file, "wb") as f:
        f.truncate(3 * MiB)
    with open(data_file, "wb") as f:
        f.truncate(MiB)
    run("cryptsetup", "luksFormat", "--type", "luks1", "-q", "--pbkdf-force-iterations", "1000",
        "--key-file", pw, "--header", hdr_file, data_file)
    data = random_bytes(MiB, 10)
    with LuksDevice(FileDevice(data_file, writable=True), header=FileDevice(hdr_file), writable=True,
                    passphrase=PASSPHRASE) as dev:
        assert dev.size == MiB - dev.payload_offset
        dev.pwrite(data[: dev.size], 0)
        off = dev.payload_offset
    assert cs_test_passphrase(data_file, pw, "--header", hdr_file)
    with detect.open(str(data_file), format="luks", luks_header=str(hdr_file), passphrase=PASSPHRASE) as dev:
        assert dev.pread(dev.size, 0) == data[: dev.size]
    # oracle: the same volume key in an attached volume, data written by qemu
    key = bytes.fromhex(cs_dump_fields(hdr_file, "-q", "--dump-master-key", "--key-file", pw)["MK dump"]
                        .replace(" ", ""))
    vk = secret_file(tmp_path, key, "vk")
    att = tmp_path / "att.luks"
    cs_format(att, pw, size=3 * MiB, extra=["--volume-key-file", str(vk)])
    raw = tmp_path / "raw"
    payload_at = read_header(FileDevice(att)).payload_offset * 512
    raw.write_bytes(data[: MiB - off].ljust(3 * MiB - payload_at, b"\0"))
    qemu_write(att, pw, raw)
    with open(att, "rb") as f:
        f.seek(payload_at)
        expect = f.read(MiB - off)
    assert data_file.read_bytes()[off:] == expect
    # our detached format: cryptsetup accepts it
    h2 = tmp_path / "hdr2.img"
    assert cli(["luks", "format", str(data_file), "--header", str(h2), "--pbkdf-force-iterations", "1000",
                "--new-passphrase-file", str(pw), "-q"]) == 0
    assert cs_test_passphrase(data_file, pw, "--header", h2)
    assert read_header(FileDevice(h2)).payload_offset == 0


def test_luks_inside_qcow2_opens_with_a_secret(tmp_path):
    """imageformats.open stacks luks over qcow2 when a secret is given."""
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "in.luks"
    cs_format(img, pw, size=3 * MiB)
    raw = tmp_path / "data.raw"
    raw.write_bytes(random_bytes(MiB, 11))
    qemu_write(img, pw, raw)
    q = tmp_path / "outer.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, q)
    with detect.open(str(q), passphrase=PASSPHRASE) as dev:
        assert [layer.format_name for layer in dev.layers()][:2] == ["luks", "qcow2"]
        assert dev.pread(dev.size, 0) == raw.read_bytes()
    with detect.open(str(q)) as dev:  # without a secret the guest disk is the LUKS volume itself
        assert dev.format_name == "qcow2"


def test_memory_device_roundtrip_read_by_qemu(tmp_path):
    """luks_format + LuksDevice on a MemoryDevice, dumped to a file: qemu decrypts our writes."""
    pw = secret_file(tmp_path, PASSPHRASE)
    mem = MemoryDevice(2 * MiB + 64 * 1024)
    hdr, vk = luks_format(mem, PASSPHRASE, iterations=1000, cipher="aes-cbc-essiv:sha256", key_bits=128)
    data = random_bytes(64 * 1024, 12)
    with LuksDevice(mem.clone(), volume_key=vk, writable=True) as dev:
        dev.pwrite(data, 0)
    img = tmp_path / "mem.luks"
    img.write_bytes(mem.data)
    assert qemu_read(img, pw, tmp_path / "q.raw")[: len(data)] == data
