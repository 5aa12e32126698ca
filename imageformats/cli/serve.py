"""``imageformats serve IMG [IMG...]``: serve images over NBD (like qemu-nbd / nbdkit).

Listens on a Unix socket (``--socket``) or TCP (``--port``, bound to 127.0.0.1
unless ``--bind``), or on the socket handed over by systemd socket activation
(LISTEN_PID/LISTEN_FDS), which is how ``nbdcopy -- [ imageformats serve IMG ] out``
and libnbd's ``connect_systemd_socket_activation`` start it.  ``--run CMD`` starts
the server, runs CMD through the shell with ``$uri`` and ``$nbd`` set, and exits
with CMD's status (nbdkit --run).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import urllib.parse

from ..errors import InvalidArgumentError
from ..nbd.protocol import DEFAULT_MAX_PAYLOAD
from .common import add_secret_arguments, open_image, parse_size

SD_LISTEN_FDS_START = 3


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve images over NBD (Unix socket, TCP, socket activation)")
    p.add_argument("images", nargs="+", metavar="IMG", help="image path or URL; each becomes an export")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", "-U", metavar="PATH", help="listen on a Unix socket")
    where.add_argument("--port", "-p", type=int, metavar="N", help="listen on TCP port N (0: any free port)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR", help="TCP address to bind (default 127.0.0.1)")
    p.add_argument("--writable", "-w", action="store_true", help="allow writes (read-only by default)")
    p.add_argument("--export", "-e", action="append", default=[], metavar="NAME",
                   help="export name of the next image (repeatable; default: the file name). "
                        "The empty name always selects the first export")
    p.add_argument("-f", "--format", help="force the format stack of every image (e.g. xz,qcow2)")
    p.add_argument("--run", metavar="CMD", help="run CMD with $uri/$nbd set, then exit with its status")
    p.add_argument("--print-uri", action="store_true", help="print the NBD URI on stdout once listening")
    p.add_argument("--max-payload", type=parse_size, default=DEFAULT_MAX_PAYLOAD, metavar="SIZE",
                   help="largest READ/WRITE request (default 32M)")
    p.add_argument("--max-inflight", type=int, default=16, metavar="N", help="requests in flight per connection")
    p.add_argument("--workers", type=int, default=4, metavar="N",
                   help="most worker threads per connection (default 4); a connection starts with one "
                        "and adds one whenever a request takes over 10 ms")
    p.add_argument("--threads", type=int, default=8, metavar="N", help="I/O threads shared by TLS connections")
    p.add_argument("--tls", choices=["off", "on", "require"], default="off",
                   help="TLS mode (needs --tls-certificates or --tls-psk)")
    p.add_argument("--tls-certificates", metavar="DIR", help="directory with server-cert.pem, server-key.pem (ca-cert.pem)")
    p.add_argument("--tls-verify-peer", action="store_true", help="require client certificates signed by ca-cert.pem")
    p.add_argument("--tls-psk", metavar="FILE", help="psktool key file (needs Python 3.13+)")
    p.add_argument("--verbose", "-v", action="store_true", help="log connections and errors")
    add_secret_arguments(p)
    p.set_defaults(func=run)


def activation_socket() -> socket.socket | None:
    """The listening socket passed by systemd socket activation, if any (sd_listen_fds(3))."""
    pid, fds = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if not pid or not fds:
        return None
    try:
        if int(pid) != os.getpid() or int(fds) < 1:
            return None
    except ValueError:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not inherited by --run commands
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(sock.fileno(), False)
    return sock


def _export_names(args) -> list[str]:
    if len(args.export) > len(args.images):
        raise InvalidArgumentError("more --export names than images")
    names = list(args.export)
    for path in args.images[len(names):]:
        base = os.path.basename(urllib.parse.urlparse(path).path if "://" in path else path)
        names.append(base or path)
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise InvalidArgumentError(f"two exports are named {name!r}; give --export NAME for each image")
        seen.add(name)
    return names


def _uri(address, export: str, tls: bool = False) -> str:
    """The NBD URI of an export (NBD URI spec: nbd[s]://host:port/name, nbd[s]+unix:///name?socket=)."""
    name = urllib.parse.quote(export)
    scheme = "nbds" if tls else "nbd"
    if isinstance(address, str):
        return f"{scheme}+unix:///{name}?socket={urllib.parse.quote(address)}"
    host, port = address[0], address[1]
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/{name}"


def run(args) -> int:
    # The server (asyncio, ssl, threads) is imported here, not at parser build time:
    # every other command would pay for it on start-up.
    import asyncio

    from ..nbd.server import Export, tls_context_psk, tls_context_x509

    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="imageformats serve: %(message)s")
    tls = None
    if args.tls != "off":
        if args.tls_psk:
            tls = tls_context_psk(args.tls_psk)
        elif args.tls_certificates:
            tls = tls_context_x509(args.tls_certificates, verify_peer=args.tls_verify_peer)
        else:
            raise InvalidArgumentError("--tls needs --tls-certificates DIR or --tls-psk FILE")
    names = _export_names(args)
    exports: list = []
    try:
        for path, name in zip(args.images, names):
            dev = open_image(args, path, writable=args.writable, fmt=args.format)
            exports.append(Export(name, dev, description=path, writable=args.writable))
        return asyncio.run(_serve(args, exports, tls))
    finally:
        for exp in exports:
            exp.device.close()


async def _serve(args, exports: list, tls) -> int:
    import asyncio

    from ..nbd.server import NBDServer

    server = NBDServer(exports, max_payload=args.max_payload, max_inflight=args.max_inflight,
                       workers=args.workers, threads=args.threads, tls=tls, tls_required=args.tls == "require")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    tmpdir = None
    try:
        sock = activation_socket()
        if sock is not None:
            await server.start_socket(sock)
        elif args.socket:
            await server.start_unix(args.socket)
        elif args.port is not None or not args.run:
            await server.start_tcp(args.bind, 10809 if args.port is None else args.port)
        else:
            tmpdir = tempfile.mkdtemp(prefix="imageformats-nbd-")
            await server.start_unix(os.path.join(tmpdir, "socket"))
        address = server.addresses[0]
        uri = _uri(address, exports[0].name, tls=args.tls == "require")
        if args.print_uri:
            print(uri, flush=True)
        serving = asyncio.ensure_future(server.serve_forever())
        if args.run:
            env = dict(os.environ, uri=uri, nbd=uri, exportname=exports[0].name)
            if isinstance(address, str):
                env["unixsocket"] = address
            else:
                env["port"] = str(address[1])
            proc = await asyncio.create_subprocess_shell(args.run, env=env)
            waiter = asyncio.ensure_future(proc.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                proc.terminate()
            rc = await waiter
            stopper.cancel()
            status = rc if rc >= 0 else 128 - rc
        else:
            await stop.wait()
            status = 0
        serving.cancel()
        await server.close()
        return status
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        elif args.socket and os.path.exists(args.socket):
            try:
                os.unlink(args.socket)
            except OSError:
                pass
