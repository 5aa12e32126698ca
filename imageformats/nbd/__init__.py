"""Serving image stacks: the built-in NBD server, an nbdkit python plugin, an imageio-style adapter.

    from imageformats.nbd import NBDServer, Export
"""

from .server import Export, NBDServer

__all__ = ["NBDServer", "Export"]
