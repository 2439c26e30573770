"""Migration review_due_dates: a decision stored before due dates were review moments is reviewed once.

Found by the time audit: an invoice sent with payment terms becomes debt at its due date, and since
d838bb8 compute stores that moment as the account's next review, when beat recomputes it (no Stripe
event comes then). A decision stored before (by the code of next_review_at's own migration or earlier)
has none: the account, current when the invoice was sent, stayed current past its due date, never
entering dunning, until some other event about it came.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from freezegun import freeze_time

from app.db import make_engine
from app.migrate import upgrade
from app.policy_file import load_policy
from app.recompute.service import run_recompute
from tests.integration.migration_setup import due_reviews, upgrade_to_before

# The migration marks its accounts due at the database's now(), which no frozen clock moves: the
# invoice was sent two days before this run, due in 30 days.
SENT_AT = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
DUE_AT = SENT_AT + timedelta(days=30)


def _review(engine, account: str):
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT next_review_at, status FROM subs_dunning WHERE account_id = %(a)s",
                                    {"a": account}).one()


def test_an_account_stored_without_its_due_date_is_reviewed_and_enters_dunning_when_due(empty_database: str):
    url = empty_database
    upgrade_to_before(url, "review_due_dates")
    engine = make_engine(url)
    policy = load_policy()
    try:
        with engine.begin() as conn:
            for account, customer, status, remaining, due in (
                    ("acct_terms", "cus_terms", "open", 5000, DUE_AT),
                    # due yesterday: overdue already when the release comes
                    ("acct_overdue", "cus_overdue", "open", 5000, SENT_AT + timedelta(days=1)),
                    ("acct_paid", "cus_paid", "paid", 0, DUE_AT)):
                conn.exec_driver_sql("INSERT INTO subs_account (account_id) VALUES (%(a)s)", {"a": account})
                conn.exec_driver_sql("INSERT INTO subs_customer (stripe_customer_id, account_id) "
                                     "VALUES (%(c)s, %(a)s)", {"c": customer, "a": account})
                conn.exec_driver_sql(
                    "INSERT INTO stripe_invoice (id, stripe_customer_id, status, amount_due, amount_remaining, "
                    "created, due_date, lines, source_created, source_rank, source_event_id) VALUES (%(i)s, %(c)s, "
                    "%(s)s, 5000, %(r)s, %(at)s, %(due)s, '[{\"product\": \"prod_core\", \"amount\": 5000}]', "
                    "1, 1, 'evt_1')",
                    {"i": f"in_{account}", "c": customer, "s": status, "r": remaining, "at": SENT_AT, "due": due})
                # As the code before due dates were review moments stored it when the invoice was sent:
                # current, nothing unpaid, no review.
                conn.exec_driver_sql("INSERT INTO subs_dunning (account_id, status, level, version) "
                                     "VALUES (%(a)s, 'current', 'none', 1)", {"a": account})
        assert due_reviews(engine, DUE_AT + timedelta(days=5)) == []  # past their due dates, nobody recomputes them

        upgrade(url)
        assert due_reviews(engine, datetime.now(UTC)) == ["acct_overdue", "acct_terms"]  # once, at once
        assert _review(engine, "acct_paid")[0] is None
        for account in ("acct_terms", "acct_overdue"):
            run_recompute(engine, policy, account, "STATE_REFRESH")
        assert _review(engine, "acct_terms") == (DUE_AT, "current")
        assert _review(engine, "acct_overdue") == (SENT_AT + timedelta(days=4), "past_due")

        with freeze_time(DUE_AT + timedelta(minutes=1)):
            assert "acct_terms" in due_reviews(engine, datetime.now(UTC))
            run_recompute(engine, policy, "acct_terms", "STATE_REFRESH")
        assert _review(engine, "acct_terms")[1] == "past_due"
    finally:
        engine.dispose()
