"""Serving image stacks: the built-in NBD server, an nbdkit python plugin, an imageio-style adapter.

    from imageformats.nbd import NBDServer, Export
"""

__all__ = ["NBDServer", "Export"]


def __getattr__(name: str):
    # Lazy (PEP 562): importing imageformats.nbd.protocol must not start up asyncio and ssl.
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
