"""The sweep's collector pacing is its own business: set while a segment runs, restored after."""

from __future__ import annotations

import gc

import pytest

from app.sweep.collector import SWEEP_THRESHOLD, fewer_collections


def test_the_threshold_is_raised_while_sweeping_and_restored_even_on_failure():
    before = gc.get_threshold()
    with fewer_collections():
        assert gc.get_threshold() == (max(before[0], SWEEP_THRESHOLD), *before[1:])
        assert gc.isenabled()  # paced, never switched off
    assert gc.get_threshold() == before
    with pytest.raises(RuntimeError), fewer_collections():
        raise RuntimeError("a sweep segment failed")
    assert gc.get_threshold() == before
