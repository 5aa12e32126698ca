"""HttpDevice against a real nginx on loopback (started here, killed at the end).

Oracles: the bytes of the files nginx serves, qemu-img / xz reading local copies,
and nginx's own access log for the number of requests.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from imageformats.errors import DeviceIOError, InvalidArgumentError, ReadOnlyError, UnsupportedFeatureError
from imageformats.http import HttpDevice

from peers import run, stop_process, tool

IMAGEFORMATS = [sys.executable, "-m", "imageformats"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Nginx:
    url: str
    https: str
    www: Path
    access_log: Path
    cafile: Path

    def statuses_for_prefix(self, prefix: str) -> list[int]:
        """HTTP statuses of the logged requests whose path starts with ``prefix`` (combined log format)."""
        out = []
        for line in self.access_log.read_text().splitlines():
            request = line.split('"')[1] if line.count('"') >= 2 else ""
            if " " in request and request.split(" ")[1].startswith(prefix):
                out.append(int(line.split('"')[2].split()[0]))
        return out

    def requests_for_prefix(self, prefix: str) -> int:
        return len(self.statuses_for_prefix(prefix))

    def requests_for(self, path: str) -> int:
        return sum(1 for line in self.access_log.read_text().splitlines() if f" {path} HTTP" in line)


CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 128; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/t_body;
    proxy_temp_path {d}/t_proxy;
    fastcgi_temp_path {d}/t_fcgi;
    uwsgi_temp_path {d}/t_uwsgi;
    scgi_temp_path {d}/t_scgi;
    default_type application/octet-stream;
    keepalive_requests 5;
    # about a third of the requests under /sometimes/ fail with 503 (transient errors)
    split_clients "${{request_id}}" $flaky {{ 33% fail; * ok; }}
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{sport} ssl;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        root {d}/www;
        location /norange/ {{ max_ranges 0; }}
        location = /flaky {{ return 503; }}
        location /moved/ {{ rewrite ^/moved/(.*)$ /$1 redirect; }}
        location /nohead/ {{
            alias {d}/www/;
            if ($request_method = HEAD) {{ return 405; }}
        }}
        location /sometimes/ {{
            alias {d}/www/;
            if ($flaky = fail) {{ return 503; }}
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    d = tmp_path_factory.mktemp("nginx")
    (d / "www" / "norange").mkdir(parents=True)
    subprocess.run([tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")], check=True, capture_output=True)
    for attempt in range(5):
        port, sport = free_port(), free_port()
        (d / "nginx.conf").write_text(CONF.format(d=d, port=port, sport=sport))
        proc = subprocess.Popen([tool("nginx"), "-c", str(d / "nginx.conf"), "-p", str(d), "-e", str(d / "error.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        up = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                up = True
                break
            except OSError:
                time.sleep(0.05)
        if up:
            break
        proc.kill()
        proc.wait()
    else:
        raise AssertionError(f"nginx did not start: {(d / 'error.log').read_text()}")
    try:
        yield Nginx(f"http://127.0.0.1:{port}", f"https://127.0.0.1:{sport}", d / "www", d / "access.log",
                    d / "cert.pem")
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def blob(nginx):
    data = os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(777)
    (nginx.www / "blob.raw").write_bytes(data)
    (nginx.www / "norange" / "blob.raw").write_bytes(data)
    return data


def test_random_reads_match_the_file(nginx, blob):
    with HttpDevice(f"{nginx.url}/blob.raw", cache_block=64 << 10, cache_blocks=8) as dev:
        assert dev.size == len(blob)
        assert dev.readonly and dev.format_name == "http"
        rnd = random.Random(1)
        for _ in range(60):
            n = rnd.choice([1, 511, 4096, 70_000, 300_000, 1 << 20])
            off = rnd.randrange(0, len(blob) - n + 1)
            assert dev.pread(n, off) == blob[off : off + n]
        assert dev.pread(10, len(blob) - 10) == blob[-10:]
        # small reads in one cached block cost one request
        before = dev.requests
        dev.pread(100, 5000)
        dev.pread(100, 6000)
        dev.pread(100, 7000)
        assert dev.requests - before <= 1
        with pytest.raises(ReadOnlyError):
            dev.pwrite(b"x", 0)
        # clones share the pool and cache and read in parallel
        errors = []

        def worker(seed):
            c = dev.clone()
            r = random.Random(seed)
            try:
                for _ in range(20):
                    n = r.randrange(1, 200_000)
                    off = r.randrange(0, len(blob) - n)
                    if c.pread(n, off) != blob[off : off + n]:
                        errors.append((seed, off, n))
            except Exception as exc:
                errors.append(exc)
            finally:
                c.close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors


def test_errors_are_clear(nginx, blob):
    with pytest.raises(InvalidArgumentError, match=r"not found \(HTTP 404\)"):
        HttpDevice(f"{nginx.url}/missing.raw?token=SECRET123")
    # nginx with max_ranges 0 answers 200 with the whole file
    with pytest.raises(UnsupportedFeatureError, match=r"ignored the Range header \(200 instead of 206\)"):
        dev = HttpDevice(f"{nginx.url}/norange/blob.raw")
        dev.pread(4096, 4096)
    before = nginx.requests_for("/flaky")
    with pytest.raises(DeviceIOError, match=r"failed after 3 attempts.*503"):
        HttpDevice(f"{nginx.url}/flaky", retries=2, backoff=0.01)
    time.sleep(0.2)  # nginx writes the access log line after the response
    assert nginx.requests_for("/flaky") - before == 3
    # a redirect is followed
    with HttpDevice(f"{nginx.url}/moved/blob.raw") as dev:
        assert dev.pread(1000, 12345) == blob[12345:13345]


def test_query_string_never_shown(nginx, blob):
    with HttpDevice(f"{nginx.url}/blob.raw?token=SECRET123") as dev:
        assert dev.pread(100, 0) == blob[:100]
        assert "SECRET123" not in repr(dev) and "SECRET123" not in str(dev.layer_info())
    proc = subprocess.run([*IMAGEFORMATS, "info", f"{nginx.url}/missing?token=SECRET123"], capture_output=True)
    assert proc.returncode == 2
    assert b"HTTP 404" in proc.stderr and b"SECRET123" not in proc.stderr + proc.stdout


def test_https(nginx, blob):
    ctx = ssl.create_default_context(cafile=str(nginx.cafile))
    with HttpDevice(f"{nginx.https}/blob.raw", ssl_context=ctx) as dev:
        assert dev.pread(200_000, 1 << 20) == blob[1 << 20 : (1 << 20) + 200_000]
    with pytest.raises(DeviceIOError, match="CERTIFICATE_VERIFY_FAILED"):
        HttpDevice(f"{nginx.https}/blob.raw", retries=0)
    # the CLI uses the default context: SSL_CERT_FILE names the trusted CA
    out = nginx.www.parent / "https-out.raw"
    subprocess.run([*IMAGEFORMATS, "convert", f"{nginx.https}/blob.raw", str(out)], check=True,
                   env={**os.environ, "SSL_CERT_FILE": str(nginx.cafile)})
    assert out.read_bytes() == blob


def test_convert_and_serve_remote_images(nginx, blob, tmp_path):
    out = tmp_path / "out.raw"
    subprocess.run([*IMAGEFORMATS, "convert", f"{nginx.url}/blob.raw", str(out)], check=True)
    assert out.read_bytes() == blob
    # a qcow2 compressed with xz, both made by the real tools, read through HTTP
    raw = tmp_path / "guest.raw"
    raw.write_bytes(blob[: 2 << 20] + bytes(2 << 20) + blob[-5120:])  # a whole number of sectors, as qcow2 stores
    qcow = tmp_path / "guest.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    shutil.copy(qcow, nginx.www / "guest.qcow2")
    (nginx.www / "guest.qcow2.xz").write_bytes(run("xz", "-T2", "--block-size=1MiB", "-c", qcow).stdout)
    out2 = tmp_path / "out2.raw"
    subprocess.run([*IMAGEFORMATS, "convert", f"{nginx.url}/guest.qcow2.xz", str(out2)], check=True)
    assert out2.read_bytes() == raw.read_bytes()
    # served over NBD like `nbdkit curl --filter=xz` (xz -> qcow2 -> guest): qemu-img reads the local qcow2
    # as the oracle
    proc = subprocess.run([*IMAGEFORMATS, "serve", f"{nginx.url}/guest.qcow2.xz",
                           "--run", f'qemu-img compare -f qcow2 -F raw {qcow} "$uri"'], capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_transient_errors_are_retried(nginx, blob):
    """A third of the requests fail with 503: reads still return the right bytes."""
    before = nginx.requests_for_prefix("/sometimes/")
    with HttpDevice(f"{nginx.url}/sometimes/blob.raw", retries=12, backoff=0.001, cache_blocks=0) as dev:
        rnd = random.Random(7)
        for _ in range(40):
            n = rnd.randrange(1, 100_000)
            off = rnd.randrange(0, len(blob) - n)
            assert dev.pread(n, off) == blob[off : off + n]
    time.sleep(0.2)
    statuses = nginx.statuses_for_prefix("/sometimes/")[before:]
    assert statuses.count(503) >= 1 and statuses.count(206) == 40


def test_size_from_content_range_when_head_is_refused(nginx, blob):
    before = len(nginx.statuses_for_prefix("/nohead/"))
    with HttpDevice(f"{nginx.url}/nohead/blob.raw") as dev:
        assert dev.size == len(blob)
        assert dev.pread(5000, len(blob) - 5000) == blob[-5000:]
    time.sleep(0.2)
    assert nginx.statuses_for_prefix("/nohead/")[before:][:2] == [405, 206]
