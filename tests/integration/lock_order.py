"""A beat pass and a webhook of the same account at the same moment: the webhook's transaction locks
the account's recompute request and then the mirror rows, in the order of the ingest statement and
every other writer of both. A pass taking them the other way round deadlocks with it."""

from __future__ import annotations

import threading
from collections.abc import Callable

from sqlalchemy import Engine

from app.embedded import poll_until
from tests.integration.test_mirror_filing import waiting_on_a_lock
from webhooks.mirror import MirrorRow
from webhooks.store import request_recompute, upsert_row


def pass_during_a_webhook(engine: Engine, account: str, cause: str, rows: list[MirrorRow],
                          run_pass: Callable[[], object]) -> list[BaseException]:
    """Run ``run_pass`` in a thread once the webhook's transaction holds the account's request, and
    upsert ``rows`` in that transaction once the pass waits for the request: what either raised."""
    errors: list[BaseException] = []

    def beat() -> None:
        try:
            run_pass()
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    webhook = engine.connect()
    pass_ = threading.Thread(target=beat)
    try:
        with webhook.begin():  # the ingest statement's order: the request, then the mirror rows
            request_recompute(webhook, account, "PAYMENT_FAILED", cause)
            pass_.start()
            assert poll_until(lambda: waiting_on_a_lock(engine, "%dunning_request_recompute"), timeout=10)
            for row in rows:
                upsert_row(webhook, row)
    except BaseException as exc:  # reported to the caller
        errors.append(exc)
    finally:
        webhook.close()
        pass_.join(timeout=30)
    return errors
