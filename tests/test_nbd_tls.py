"""TLS (X.509) on the built-in server, checked with libnbd's GnuTLS client (nbdinfo, nbdcopy)."""

from __future__ import annotations

import subprocess
import sys

from peers import tool

IMAGEFORMATS = [sys.executable, "-m", "imageformats"]


def make_pki(d):
    """A CA and a server certificate signed by it, made with openssl (nbdkit/qemu file names)."""
    d.mkdir()

    def ossl(*args):
        subprocess.run([tool("openssl"), *map(str, args)], check=True, capture_output=True)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "ca-key.pem", "-out", d / "ca-cert.pem",
         "-subj", "/CN=test-ca", "-days", "2")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "server-key.pem", "-out", d / "server.csr",
         "-subj", "/CN=localhost")
    (d / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", d / "server.csr", "-CA", d / "ca-cert.pem", "-CAkey", d / "ca-key.pem",
         "-CAcreateserial", "-out", d / "server-cert.pem", "-days", "2", "-extfile", d / "ext")
    return d


def test_tls_required(tmp_path, sparse_raw):
    pki = make_pki(tmp_path / "pki")
    out = tmp_path / "out.raw"
    script = (f'case "$uri" in nbds+unix://*) ;; *) exit 9;; esac; '
              f'tlsuri="nbds+unix:///?socket=$unixsocket&tls-certificates={pki}"; '
              f'nbdinfo --is tls "$tlsuri" && nbdcopy "$tlsuri" {out} && '
              f'! nbdinfo "nbd+unix:///?socket=$unixsocket" 2>/dev/null')
    proc = subprocess.run([*IMAGEFORMATS, "serve", sparse_raw, "--tls=require", "--tls-certificates", pki,
                           "--run", script], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == sparse_raw.read_bytes()


def test_tls_optional_and_bad_client_cert_dir(tmp_path, sparse_raw):
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")  # a CA that did not sign the server certificate
    # libnbd verifies the server certificate on TCP (it has no host name to check on Unix sockets)
    script = (f'nbdinfo --is tls "nbds://localhost:$port/?tls-certificates={pki}" && '
              f'! nbdinfo --is tls "$uri" && '  # plain connections allowed with --tls=on
              f'! nbdinfo "nbds://localhost:$port/?tls-certificates={other}" 2>/dev/null')
    proc = subprocess.run([*IMAGEFORMATS, "serve", sparse_raw, "--port", "0", "--tls=on", "--tls-certificates", pki,
                           "--run", script], capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_tls_psk_needs_python_313(tmp_path, sparse_raw):
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:" + "ab" * 32 + "\n")
    proc = subprocess.run([*IMAGEFORMATS, "serve", sparse_raw, "--tls=require", "--tls-psk", psk, "--run", "true"],
                          capture_output=True)
    if sys.version_info >= (3, 13):
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 4
        assert b"TLS-PSK needs Python 3.13" in proc.stderr
