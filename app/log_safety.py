"""One log record, one line: the values interpolated into a log message are escaped and capped.

Account ids (chosen by other teams), Stripe's ids and texts and HTTP inputs go into log messages as
``%s`` arguments. A value holding a newline, a carriage return or another control character (an
ANSI escape) could split a record or forge another one (``"x\\nINFO ... bad debt lifted for y"``),
and a huge value was logged whole. ``EscapeArgs`` is a filter for the handlers that write the
process's log: it rewrites the record's arguments so that each is shown as Python writes it inside
a string literal (``\\n``, ``\\r``, ``\\x1b``, ``\\u2028``) and at most ``MAX_ARG_CHARS``
characters of it (then ``...[N more characters]``). A backslash is written as it is (many values are
reprs already, Celery's among them, whose escapes would otherwise double), so ``\\n`` in a line is an
escaped newline or a typed backslash and n: the stored value tells. The message itself (our own
text), a message without arguments and a traceback (``exc_info``) are left as they are; numbers are
left as they are (``%d``, ``%.1f``).

``install`` puts it on the handlers each process writes with, where the process sets up its logging:
the Celery worker and beat (after_setup_logger / after_setup_task_logger, tasks/factory.py), the web
app (create_app: Flask's handler, gunicorn's error log, the root logger's handlers) and the
``dunning`` command (app/cli.py). Python's last-resort handler (records of a logger with no handler
anywhere above it, WARNING and up, to stderr) gets it in every process. It costs nothing when
nothing is logged, and the request path logs nothing normally. Gunicorn's access log, written for
every request, is not filtered: gunicorn itself refuses a request line or a header value holding a
control character (C0 but tab, DEL) with a 400, before anything is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from typing import Any

MAX_ARG_CHARS = 500
_DONE = "_dunning_args_escaped"
_PLAIN_TYPES = (int, float, Decimal)  # bool is an int; their text holds no control character


def escape(text: str) -> str:
    """``text`` with every character Python would not print in a string literal escaped as repr
    does, cut after MAX_ARG_CHARS characters."""
    head = text[:MAX_ARG_CHARS]
    if head.isprintable():
        if len(text) <= MAX_ARG_CHARS:
            return text
        return f"{head}...[{len(text) - MAX_ARG_CHARS} more characters]"
    out: list[str] = []
    shown = 0
    for n, ch in enumerate(text):
        piece = ch if ch.isprintable() else repr(ch)[1:-1]  # '\n' -> \n, '\x1b' -> \x1b, '\u2028' -> \u2028
        if shown + len(piece) > MAX_ARG_CHARS:
            return "".join(out) + f"...[{len(text) - n} more characters]"
        out.append(piece)
        shown += len(piece)
    return "".join(out)


def printable(text: str) -> str:
    """``text`` for a terminal: every character Python would not print in a string literal escaped
    as repr does (an ANSI escape as \\x1b, a newline as \\n), nothing cut. Other systems' and
    callers' text (account ids, Account Management's answers, reasons) shown by the ``dunning``
    command cannot then clear the screen or rewrite the lines shown."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class _Shown:
    """An argument as the message shows it: ``%s`` gives its escaped str(), ``%r`` its escaped
    repr() (a str's repr escapes its own), both capped."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape(str(self.value))

    def __repr__(self) -> str:
        return escape(repr(self.value))


def _safe(value: Any) -> Any:
    if value is None or isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, str):
        head = value[:MAX_ARG_CHARS]
        if len(value) <= MAX_ARG_CHARS and head.isprintable():
            return value  # the usual case: nothing to do, and %r still shows it quoted
    return _Shown(value)


class _ShownMapping(Mapping[Any, Any]):
    """Mapping arguments of another type than dict (gunicorn's SafeAtoms answers '-' for a key it
    lacks): looked up in them, the value shown as _safe shows it."""

    __slots__ = ("args",)

    def __init__(self, args: Mapping[Any, Any]) -> None:
        self.args = args

    def __getitem__(self, key: Any) -> Any:
        return _safe(self.args[key])

    def __iter__(self) -> Iterator[Any]:
        return iter(self.args)

    def __len__(self) -> int:
        return len(self.args)


class EscapeArgs(logging.Filter):
    """Escapes and caps the record's interpolated arguments (see the module's doc); never drops a
    record. Once per record, however many filtered handlers it goes through."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if args and not getattr(record, _DONE, False):
            if type(args) is dict:  # Celery's: "Task %(name)s[%(id)s] ..."
                record.args = {key: _safe(value) for key, value in args.items()}
            elif isinstance(args, Mapping):
                record.args = _ShownMapping(args)
            elif isinstance(args, tuple):
                record.args = tuple(_safe(value) for value in args)
            setattr(record, _DONE, True)
        return True


ESCAPE_ARGS = EscapeArgs()


def install(handlers: Iterable[logging.Handler] = (), loggers: Iterable[logging.Logger | str] = ()) -> None:
    """Filter ``handlers``, every handler of ``loggers`` (as they are now) and Python's last-resort
    handler. Idempotent (a handler holds the one filter once)."""
    chosen = list(handlers)
    for logger in loggers:
        chosen.extend((logging.getLogger(logger) if isinstance(logger, str) else logger).handlers)
    if logging.lastResort is not None:
        chosen.append(logging.lastResort)
    for handler in chosen:
        handler.addFilter(ESCAPE_ARGS)  # logging's Filterer adds a filter it already has only once
