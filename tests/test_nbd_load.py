"""The NBD server under load: 16 concurrent clients doing random reads, writes and zeroes for a
bounded time on a Unix socket, against `imageformats serve` in its own process.

Exports: a raw file and a qcow2 made by qemu-img (so the qcow2 writable device is under load too).
Each client owns a disjoint 512 KiB region (so a per-client model is exact under concurrency) and also
reads a shared region no one writes.  Every reply is compared with the model; at the end the qcow2 is
checked by `qemu-img check` and its content read back by `qemu-img convert` (the real tool is the
oracle), and the server's VmRSS after the run must stay within a few MiB of its RSS after warm-up.
LOAD_SECONDS (default 4) sets the duration; scripts/fuzz-long.sh runs it longer.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time

from imageformats.nbd import protocol as P

from nbd_util import RawClient, serve_cli

CLIENTS = 16
REGION = 512 * 1024
SHARED = 1 << 20
SIZE = SHARED + CLIENTS * REGION
SECONDS = float(os.environ.get("LOAD_SECONDS", "4"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def client(sock, export, idx, region, shared, stop, results, seed):
    rng = random.Random(f"{seed}-{idx}")
    base = SHARED + idx * REGION
    model = bytearray(region)
    done = 0
    try:
        c = RawClient(sock, timeout=30)
        c.handshake()
        c.go(export, structured=False, meta=False)
        cookie = 0
        while not stop.is_set():
            cookie += 1
            kind = rng.random()
            off = rng.randrange(0, REGION - 1)
            n = rng.randrange(1, min(REGION - off, 65536) + 1)
            if kind < 0.35:
                data = rng.randbytes(n)
                c.request(P.NBD_CMD_WRITE, base + off, n, cookie=cookie, data=data,
                          flags=P.NBD_CMD_FLAG_FUA if rng.random() < 0.1 else 0)
                err, ck, _ = c.simple_reply()
                assert (err, ck) == (0, cookie)
                model[off:off + n] = data
            elif kind < 0.45:
                c.request(P.NBD_CMD_WRITE_ZEROES, base + off, n, cookie=cookie)
                err, ck, _ = c.simple_reply()
                assert (err, ck) == (0, cookie)
                model[off:off + n] = bytes(n)
            elif kind < 0.85:
                c.request(P.NBD_CMD_READ, base + off, n, cookie=cookie)
                err, ck, data = c.simple_reply(n)
                assert (err, ck) == (0, cookie)
                assert data == bytes(model[off:off + n]), f"client {idx}: wrong data at {base + off}+{n}"
            elif kind < 0.95:
                so = rng.randrange(0, SHARED - 1)
                sn = rng.randrange(1, min(SHARED - so, 65536) + 1)
                c.request(P.NBD_CMD_READ, so, sn, cookie=cookie)
                err, ck, data = c.simple_reply(sn)
                assert (err, ck) == (0, cookie) and data == shared[so:so + sn]
            else:
                c.request(P.NBD_CMD_FLUSH, cookie=cookie)
                assert c.simple_reply()[:2] == (0, cookie)
            done += 1
        c.request(P.NBD_CMD_FLUSH, cookie=cookie + 1)
        assert c.simple_reply()[:2] == (0, cookie + 1)
        c.request(P.NBD_CMD_DISC)
        c.close()
        results[idx] = (done, bytes(model))
    except BaseException as e:  # reported by the main thread
        results[idx] = e


def run_load(sock, pid, exports, regions, shared, seconds, seed):
    results = {}
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(sock, exports[i % len(exports)], i, regions[i], shared, stop,
                                                     results, seed))
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(min(1.0, seconds / 4))
    rss0 = rss_kib(pid)
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    rss1 = rss_kib(pid)
    for i in range(CLIENTS):
        r = results.get(i)
        if isinstance(r, BaseException):
            raise AssertionError(f"client {i} failed: {r!r}") from r
        assert r is not None, f"client {i} did not finish"
    return results, rss0, rss1


def test_sixteen_clients_random_io(tmp_path):
    rng = random.Random(0)
    initial = rng.randbytes(SIZE)
    rawp = tmp_path / "disk.raw"
    rawp.write_bytes(initial)
    q = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536",
                    str(rawp), str(q)], check=True)
    sock = str(tmp_path / "nbd.sock")
    with serve_cli("--socket", sock, "-w", "-e", "raw", "-e", "qcow2", "--workers", "4", rawp, q) as (proc, _):
        regions = [initial[SHARED + i * REGION:SHARED + (i + 1) * REGION] for i in range(CLIENTS)]
        results, rss0, rss1 = run_load(sock, proc.pid, ["raw", "qcow2"], regions, initial[:SHARED], SECONDS, 1)
        # a second round on new connections, from round 1's content: RSS must not keep growing
        regions = [results[i][1] for i in range(CLIENTS)]
        results2, _, rss2 = run_load(sock, proc.pid, ["raw", "qcow2"], regions, initial[:SHARED], SECONDS, 2)
    total = sum(r[0] for r in results.values()) + sum(r[0] for r in results2.values())
    print(f"{total} requests from {CLIENTS} clients in {2 * SECONDS:.0f}s; RSS {rss0} -> {rss1} -> {rss2} KiB")
    assert total > CLIENTS * 20
    assert rss2 - rss1 < 16 * 1024, (rss0, rss1, rss2)
    raw_after = rawp.read_bytes()
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(q)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    out = tmp_path / "q.raw"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(q), str(out)], check=True)
    q_after = out.read_bytes()
    assert raw_after[:SHARED] == initial[:SHARED] and q_after[:SHARED] == initial[:SHARED]
    for i in range(CLIENTS):
        img = raw_after if i % 2 == 0 else q_after
        base = SHARED + i * REGION
        assert img[base:base + REGION] == results2[i][1], f"client {i}: final content differs from the model"
