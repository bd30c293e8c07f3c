"""The NBD source, laid out like `fuse/`:

* `wire`: the protocol's numbers and structures (doc/proto.md of NetworkBlockDevice/nbd);
* `handshake`, `transmission`: the two protocol phases, sans I/O;
* `pool`: connections on trio sockets, dialled, handshaken, each with a reader task;
* `buffers`: receive buffers and their reuse; `extents`: the block status cache;
* `source`: `NbdSource` (the `Source`) and `open_nbd_source`, which owns the tasks' nursery.
"""

from .source import NbdAddress, NbdOptions, NbdSource, open_nbd_source, parse_nbd_url, same_nbd_export

__all__ = ["NbdAddress", "NbdOptions", "NbdSource", "open_nbd_source", "parse_nbd_url",
           "same_nbd_export"]
