"""The log filter that keeps one record on one line (app/log_safety.py): what it does to a record's
arguments, and what it leaves alone."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from decimal import Decimal

import pytest

from app.log_safety import ESCAPE_ARGS, MAX_ARG_CHARS, escape, install

FORMAT = "%(levelname)s %(name)s: %(message)s"


@pytest.fixture
def written() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own writing, through a filtered handler, into a string."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger("tests.log_safety")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.handlers = [handler]
    install(handlers=[handler])
    yield logger, out
    logger.handlers = []
    logger.propagate = True


def test_an_id_holding_a_newline_stays_on_its_record_s_line(written) -> None:
    logger, out = written
    logger.info("bad-debt payment %s of %s disputed", "pay_1", "acct_x\nINFO app: bad debt lifted for acct_y")
    assert out.getvalue() == ("INFO tests.log_safety: bad-debt payment pay_1 of "
                              "acct_x\\nINFO app: bad debt lifted for acct_y disputed\n")


@pytest.mark.parametrize(("value", "shown"), [
    ("a\rb", "a\\rb"),
    ("a\x1b[31mred\x1b[0m", "a\\x1b[31mred\\x1b[0m"),
    ("a\x00b\x7f\x85", "a\\x00b\\x7f\\x85"),
    ("a\u2028b\u2029", "a\\u2028b\\u2029"),
    ("a\tb\x0bc\x0c", "a\\tb\\x0bc\\x0c"),
    ("back\\slash \\n", "back\\slash \\n"),  # as it is: many values are reprs already
    ("café/ünïcode ☃ 𝄞", "café/ünïcode ☃ 𝄞"),
])
def test_control_characters_are_written_as_escapes(value: str, shown: str) -> None:
    assert escape(value) == shown


def test_a_long_value_is_cut_with_a_marker_never_inside_an_escape() -> None:
    assert escape("x" * 2000) == "x" * MAX_ARG_CHARS + "...[1500 more characters]"
    assert escape("x" * MAX_ARG_CHARS) == "x" * MAX_ARG_CHARS
    cut = escape("x" * (MAX_ARG_CHARS - 1) + "\n" * 10)
    assert cut == "x" * (MAX_ARG_CHARS - 1) + "...[10 more characters]"


def test_numbers_keep_their_formats_and_plain_strings_are_passed_as_they_are(written) -> None:
    logger, out = written
    plain = "acct_1"
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "%s %d %.1f %s %r", (plain, 3, 2.25, Decimal("1.50"),
                                                                                   plain), None)
    ESCAPE_ARGS.filter(record)
    assert isinstance(record.args, tuple)
    assert record.args[0] is plain and record.args[1] == 3
    assert record.getMessage() == "acct_1 3 2.2 1.50 'acct_1'"
    logger.warning("%s for %s failed, retry %d in %.1fs", "tasks.recompute_account", "a\nb", 2, 1.5)
    assert out.getvalue() == "WARNING tests.log_safety: tasks.recompute_account for a\\nb failed, retry 2 in 1.5s\n"


def test_repr_of_an_escaped_value_and_objects_whose_text_holds_newlines(written) -> None:
    logger, out = written
    error = ValueError('duplicate key value violates unique constraint "x"\nDETAIL:  Key (id)=(1) already exists.')
    logger.warning("value rejected by the database: %s", error)
    logger.warning("raw %r", "a\nb")
    logger.warning("list %s", ["a\nb"])
    assert out.getvalue().splitlines() == [
        'WARNING tests.log_safety: value rejected by the database: duplicate key value violates unique constraint '
        '"x"\\nDETAIL:  Key (id)=(1) already exists.',
        "WARNING tests.log_safety: raw 'a\\nb'",
        "WARNING tests.log_safety: list ['a\\nb']",
    ]


def test_mapping_arguments_as_celery_logs_them(written) -> None:
    logger, out = written
    logger.error("Task %(name)s[%(id)s] raised unexpected: %(exc)s",
                 {"name": "tasks.recompute_account", "id": "1", "exc": "Boom('a\nb')"})
    assert out.getvalue() == ("ERROR tests.log_safety: Task tasks.recompute_account[1] raised unexpected: "
                              "Boom('a\\nb')\n")


class Atoms(dict):
    """As gunicorn's SafeAtoms: '-' for a key it does not hold."""

    def __getitem__(self, key):
        return super().__getitem__(key) if key in self else "-"


def test_a_mapping_of_another_type_keeps_its_own_lookup() -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "%(h)s %(r)s %({referer}i)s",
                               (Atoms(h="127.0.0.1", r="GET /\x1b[2K"),), None)
    ESCAPE_ARGS.filter(record)
    assert record.getMessage() == "127.0.0.1 GET /\\x1b[2K -"


def test_the_message_itself_and_a_traceback_are_left_multi_line(written) -> None:
    logger, out = written
    logger.info("our own text\nwith a newline")  # no arguments: as it was
    try:
        raise RuntimeError("account 'a\nb'")
    except RuntimeError:
        logger.exception("failed for %s", "a\nb")
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["INFO tests.log_safety: our own text", "with a newline",
                         "ERROR tests.log_safety: failed for a\\nb"]
    assert lines[3] == "Traceback (most recent call last):"
    assert lines[-2:] == ["RuntimeError: account 'a", "b'"]


def test_a_record_through_two_filtered_handlers_is_escaped_once() -> None:
    outs = [io.StringIO(), io.StringIO()]
    handlers = [logging.StreamHandler(o) for o in outs]
    install(handlers=handlers)
    install(handlers=handlers)  # again: the filter is held once
    assert all(h.filters == [ESCAPE_ARGS] for h in handlers)
    logger = logging.getLogger("tests.log_safety.twice")
    logger.propagate = False
    logger.handlers = list(handlers)
    try:
        logger.warning("id %s", "a\\b\nc")
    finally:
        logger.handlers = []
        logger.propagate = True
    assert [o.getvalue() for o in outs] == ["id a\\b\\nc\n"] * 2


def test_install_covers_python_s_last_resort_handler() -> None:
    install()
    assert ESCAPE_ARGS in logging.lastResort.filters  # type: ignore[union-attr]
    err = io.StringIO()
    saved, sys.stderr = sys.stderr, err
    logger = logging.getLogger("tests.log_safety.nowhere")
    logger.propagate = False  # no handler anywhere: Python's last resort writes it
    try:
        logger.warning("event %s not queued", "evt_1\nERROR forged")
    finally:
        sys.stderr = saved
        logger.propagate = True
    assert err.getvalue() == "event evt_1\\nERROR forged not queued\n"
