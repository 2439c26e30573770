"""Task ids and message delivery tags: random version-4 UUID strings, as ``str(uuid.uuid4())``
writes them, drawn without a system call.

Why not uuid4: it reads ``os.urandom`` for every id, a system call around which CPython releases
the GIL, so in a web worker whose threads all want the GIL the caller queues to get it back; and it
builds a UUID object only to print it. Three ids per webhook (task id, two delivery tags) took
about 12 us of a flush's CPU this way, 6 us with this module (one process, timed alone). These ids
need to be unique, not secret, so a generator of our own, seeded from ``os.urandom``, does: 122
random bits each, as uuid4.

The generator is this module's own (tests that seed the ``random`` module, as hypothesis does,
cannot make ids repeat) and a forked child reseeds it, so that two worker processes forked from
one parent never draw the same sequence.
"""

from __future__ import annotations

import os
import random

_VARIANT_AND_VERSION_MASK = ~((0xF << 76) | (0x3 << 62))
_VARIANT_AND_VERSION = (0x4 << 76) | (0x2 << 62)  # version 4, RFC 4122 variant

_generator = random.Random()  # seeded from os.urandom
os.register_at_fork(after_in_child=_generator.seed)


def uuid4_str() -> str:
    """A random UUID (version 4) in its canonical 36-character form."""
    h = f"{_generator.getrandbits(128) & _VARIANT_AND_VERSION_MASK | _VARIANT_AND_VERSION:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
