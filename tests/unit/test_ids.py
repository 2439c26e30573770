"""app/ids.py: task ids and delivery tags are canonical random UUIDs, unique, also across a fork."""

from __future__ import annotations

import os
import random
import uuid

import pytest

from app.ids import uuid4_str


def test_an_id_is_a_canonical_version_4_uuid():
    for _ in range(2000):
        text = uuid4_str()
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # lower-case hex, hyphens where uuid4 puts them
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_ids_do_not_repeat_and_use_every_random_bit():
    ids = [uuid.UUID(uuid4_str()).int for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    fixed = (0xF << 76) | (0x3 << 62)  # the version and variant bits
    seen_set = 0
    seen_clear = 0
    for value in ids:
        seen_set |= value
        seen_clear |= ~value
    assert (seen_set & seen_clear & ~fixed) == (1 << 128) - 1 & ~fixed  # each other bit took both values


def test_seeding_the_random_module_does_not_repeat_ids():
    """hypothesis (and any test) seeds the global generator; ids must not follow it."""
    random.seed(7)
    first = uuid4_str()
    random.seed(7)
    assert uuid4_str() != first


# Python 3.12+ warns about any fork of a process that has threads (earlier tests leave some); the
# child here only draws an id and leaves, taking no lock another thread could hold.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_does_not_draw_its_parents_ids():
    """gunicorn and Celery fork their workers from one parent: each must draw its own sequence."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave without running any test machinery
        os.close(read)
        os.write(write, uuid4_str().encode())
        os._exit(0)
    os.close(write)
    child = b""
    while chunk := os.read(read, 64):
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 36
    assert child.decode() != uuid4_str()
