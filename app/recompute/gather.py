"""Gather: one consistent snapshot of everything about an account, in one SQL statement.

The statement reads subs_account, subs_customer, subs_dunning, subs_mandate, subs_stuck_events,
the Stripe mirror, the retries of the account's invoices, bad-debt payments and the open bad-debt
episode. One statement means one MVCC snapshot, and the per-account advisory lock (taken by the
caller) keeps apply from interleaving with another recompute. The number of statements is fixed whatever the history
length; the same statement gathers a batch of accounts for the drift sweep.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from app.db import KEYED_PLANS
from app.domain.snapshot import (
    Attempt,
    BadDebtPayment,
    Charge,
    CustomerDefault,
    Invoice,
    InvoiceLine,
    PaymentMethod,
    Retry,
    Snapshot,
    Subscription,
    collection_paused,
)
from app.domain.state import DunningState, MandateState

GATHER_SQL = """
SELECT
  a.account_id, a.bad_debt,
  -- A correlated sub-select, like every other store here: it always becomes a keyed lookup. A join
  -- (even LATERAL) planned while subs_dunning was nearly empty became a full scan of it, kept by
  -- the cached plan as the table grew (measured: gather from 2 ms to 12 ms over 6,000 accounts).
  (SELECT json_build_array(d.status, d.level, d.failure_class, d.next_retry_at, d.retry_invoice_id,
          d.retry_payment_method_id, d.retry_free, d.retries_used, d.outstanding_amount, d.unpaid_since,
          d.last_failure_id, d.reasons, d.entitlements, d.actions_requested, d.policy_version, d.next_review_at,
          d.prior_settled_at, d.outstanding, d.announced_failures, d.version, d.changed_at)
     FROM subs_dunning d WHERE d.account_id = a.account_id) AS dunning,
  (SELECT json_agg(json_build_array(i.id, i.status, i.billing_reason, i.subscription_id, i.amount_due,
          i.amount_paid, i.amount_remaining, i.created, i.lines, i.currency, i.total, i.credited_amount,
          i.attempt_count, i.due_date, i.first_failed_at, i.last_failed_at, i.paid_at, i.voided_at,
          i.marked_uncollectible_at, i.stripe_customer_id, i.lines_incomplete) ORDER BY i.id)
     FROM stripe_invoice i
    WHERE i.stripe_customer_id IN (SELECT c.stripe_customer_id FROM subs_customer c
                                    WHERE c.account_id = a.account_id)) AS invoices,
  (SELECT json_agg(json_build_array(p.id, p.invoice_id, p.payment_method_id, p.status, p.attempted_at,
          p.amount, p.amount_refunded, p.decline_code, p.failure_code, p.advice_code, p.charges, p.failed_at,
          p.stripe_customer_id) ORDER BY p.id)
     FROM (SELECT p.* FROM stripe_payment_attempt p JOIN subs_customer c USING (stripe_customer_id)
            WHERE c.account_id = a.account_id
           UNION ALL  -- attempts known only through their invoice (invoice_payment.paid)
           SELECT p.* FROM stripe_payment_attempt p
             JOIN stripe_invoice i ON i.id = p.invoice_id
             JOIN subs_customer c ON c.stripe_customer_id = i.stripe_customer_id
            WHERE p.stripe_customer_id IS NULL AND c.account_id = a.account_id) p) AS attempts,
  (SELECT json_agg(json_build_array(m.id, m.type, m.attached, m.changed_at, m.exp_month, m.exp_year,
          m.card_brand, m.card_last4, m.stripe_customer_id, m.fingerprint) ORDER BY m.id)
     FROM stripe_payment_method m
    WHERE m.stripe_customer_id IN (SELECT c.stripe_customer_id FROM subs_customer c
                                    WHERE c.account_id = a.account_id)) AS payment_methods,
  (SELECT json_agg(json_build_array(s.default_payment_method_id, s.changed_at, s.stripe_customer_id)
          ORDER BY s.source_created DESC, s.stripe_customer_id)
     FROM stripe_customer_state s
    WHERE s.stripe_customer_id IN (SELECT c.stripe_customer_id FROM subs_customer c
                                    WHERE c.account_id = a.account_id)) AS customer_state,
  (SELECT json_agg(json_build_array(s.id, s.status, s.products, s.collection_paused) ORDER BY s.id)
     FROM stripe_subscription s
    WHERE s.stripe_customer_id IN (SELECT c.stripe_customer_id FROM subs_customer c
                                    WHERE c.account_id = a.account_id)) AS subscriptions,
  -- The retries of the invoices the account owns now, whichever account claimed them: an invoice's
  -- history (schedule position, free retry, the per-invoice cap) follows it when another team moves
  -- its customer to another account.
  (SELECT json_agg(json_build_array(r.invoice_id, r.payment_method_id, r.retry_number, r.free, r.state,
          r.scheduled_for, r.created_at, r.method_change_seen_at) ORDER BY r.id)
     FROM payment_retry r
    WHERE r.invoice_id IN (SELECT i.id FROM stripe_invoice i
                            WHERE i.stripe_customer_id IN (SELECT c.stripe_customer_id FROM subs_customer c
                                                            WHERE c.account_id = a.account_id))) AS retries,
  (SELECT json_agg(json_build_array(b.id, b.state, b.amount, b.created_at, b.updated_at, b.failure_reason,
          b.stripe_payment_intent_id, b.invoice_ids) ORDER BY b.id)
     FROM bad_debt_payment b WHERE b.account_id = a.account_id) AS bad_debt_payments,
  -- Other accounts' payments in flight on an invoice this account owns now (another team moved the
  -- customer here while it ran). The pending payments are few (partial index), each invoice one probe.
  (SELECT json_agg(json_build_array(b.id, b.state, b.amount, b.created_at, b.updated_at, b.failure_reason,
          b.stripe_payment_intent_id, b.invoice_ids) ORDER BY b.id)
     FROM bad_debt_payment b
    WHERE b.state = 'pending' AND b.account_id <> a.account_id
      AND EXISTS (SELECT 1 FROM jsonb_array_elements_text(b.invoice_ids) AS x(id)
                    JOIN stripe_invoice i ON i.id = x.id
                    JOIN subs_customer c ON c.stripe_customer_id = i.stripe_customer_id
                   WHERE c.account_id = a.account_id)) AS payments_elsewhere,
  (SELECT json_agg(json_build_array(m.payment_method_id, m.type, m.status, m.status_reason, m.is_default,
          m.card_brand, m.card_last4, m.exp_month, m.exp_year)
          ORDER BY m.payment_method_id)
     FROM subs_mandate m WHERE m.account_id = a.account_id) AS mandates,
  (SELECT count(*) FROM subs_stuck_events e
    WHERE e.account_id = a.account_id AND e.state <> 'resolved') AS stuck,
  (SELECT min(e.entered_at) FROM bad_debt_episode e
    WHERE e.account_id = a.account_id AND e.exited_at IS NULL) AS episode_entered_at
FROM subs_account a
WHERE a.account_id = ANY($1)
"""

# Planning this statement costs more than running it (about 5 ms against well under 1 ms), so each
# connection prepares it once and PostgreSQL reuses the plan.
PREPARE_SQL = "PREPARE dunning_gather(text[]) AS " + GATHER_SQL
# Keyed plans only (see app/db.py KEYED_PLANS): measured, a cached plan made on young tables kept
# scanning them as they grew.
EXECUTE_SQL = KEYED_PLANS + "; EXECUTE dunning_gather(%(ids)s)"
PREPARED_FLAG = "dunning_gather_prepared"

DUNNING_COLUMNS = ("status", "level", "failure_class", "next_retry_at", "retry_invoice_id",
                   "retry_payment_method_id", "retry_free", "retries_used", "outstanding_amount", "unpaid_since",
                   "last_failure_id", "reasons", "entitlements", "actions_requested", "policy_version",
                   "next_review_at", "prior_settled_at", "outstanding", "announced_failures")


def _stored(row: list[Any] | None) -> tuple[DunningState | None, int, datetime | None]:
    """(stored state, version, when it was decided: changed_at) of the dunning column."""
    if row is None:
        return None, 0, None
    return stored_state(row), int(row[len(DUNNING_COLUMNS)]), _t(row[len(DUNNING_COLUMNS) + 1])


def stored_state(values: list[Any]) -> DunningState:
    """The DunningState of a ``json_build_array`` of DUNNING_COLUMNS, in that order (extra values ignored)."""
    columns = dict(zip(DUNNING_COLUMNS, values, strict=False))
    columns["next_retry_at"] = _t(columns["next_retry_at"])
    columns["unpaid_since"] = _t(columns["unpaid_since"])
    columns["next_review_at"] = _t(columns.get("next_review_at"))
    columns["prior_settled_at"] = _t(columns.get("prior_settled_at"))
    return DunningState.from_columns(columns)


def _t(value: str | None) -> datetime | None:
    # to_json renders timestamptz in ISO 8601 with the session offset (UTC, set on connect).
    return datetime.fromisoformat(value) if value is not None else None


def _tt(value: str) -> datetime:
    return datetime.fromisoformat(value)


def charges(value: Mapping[str, Any] | None) -> tuple[Charge, ...]:
    """An attempt's charges column (id -> method, epoch seconds), oldest first."""
    if not value:
        return ()
    return tuple(sorted((Charge(id=k, payment_method_id=v.get("pm"), charged_at=datetime.fromtimestamp(v["at"], UTC))
                         for k, v in value.items()), key=lambda c: (c.charged_at, c.id)))


def invoice_lines(stored: Any) -> tuple[InvoiceLine, ...]:
    """An invoice's lines as the mirror stores them (JSON; rows from before it kept a line's
    subscription item have none)."""
    return tuple(InvoiceLine(product=ln["product"], amount=ln["amount"], item=ln.get("item")) for ln in (stored or ()))


def bad_debt_payment(b: list[Any]) -> BadDebtPayment:
    """A ``json_build_array`` of a bad_debt_payment's id, state, amount, created_at, updated_at,
    failure_reason, stripe_payment_intent_id and invoice_ids."""
    return BadDebtPayment(id=b[0], state=b[1], amount=b[2], created_at=_tt(b[3]), updated_at=_tt(b[4]),
                          failure_reason=b[5], stripe_payment_intent_id=b[6], invoice_ids=tuple(b[7] or ()))


def snapshot_from_row(m: Mapping[str, Any]) -> tuple[Snapshot, int]:
    """One row of the gather statement, by column name -> (snapshot, stored version)."""
    stored, version, decided_at = _stored(m["dunning"])
    invoices = tuple(
        Invoice(
            id=i[0], status=i[1], billing_reason=i[2], subscription_id=i[3], amount_due=i[4], amount_paid=i[5],
            amount_remaining=i[6], created=_tt(i[7]),
            lines=invoice_lines(i[8]),
            currency=i[9], total=i[10], credited_amount=i[11], attempt_count=i[12], due_date=_t(i[13]),
            first_failed_at=_t(i[14]), last_failed_at=_t(i[15]), paid_at=_t(i[16]), voided_at=_t(i[17]),
            marked_uncollectible_at=_t(i[18]), stripe_customer_id=i[19], lines_incomplete=bool(i[20]),
        )
        for i in (m["invoices"] or ())
    )
    attempts = tuple(
        Attempt(id=p[0], invoice_id=p[1], payment_method_id=p[2], status=p[3], attempted_at=_tt(p[4]), amount=p[5],
                amount_refunded=p[6], decline_code=p[7], failure_code=p[8], advice_code=p[9], charges=charges(p[10]),
                failed_at=_t(p[11]), stripe_customer_id=p[12])
        for p in (m["attempts"] or ())
    )
    methods = tuple(
        PaymentMethod(id=p[0], type=p[1], attached=p[2], changed_at=_tt(p[3]), exp_month=p[4], exp_year=p[5],
                      card_brand=p[6], card_last4=p[7], stripe_customer_id=p[8], fingerprint=p[9])
        for p in (m["payment_methods"] or ())
    )
    customer_defaults = tuple(CustomerDefault(stripe_customer_id=s[2], payment_method_id=s[0], changed_at=_t(s[1]))
                              for s in (m["customer_state"] or ()))
    customer_state = (m["customer_state"] or [[None, None]])[0]
    subscriptions = tuple(
        Subscription(id=s[0], status=s[1], products=tuple(s[2] or ()), collection_paused=collection_paused(s[3]))
        for s in (m["subscriptions"] or ())
    )
    retries = tuple(
        Retry(invoice_id=r[0], payment_method_id=r[1], retry_number=r[2], free=r[3], state=r[4],
              scheduled_for=_tt(r[5]), created_at=_tt(r[6]), method_change_seen_at=_t(r[7]))
        for r in (m["retries"] or ())
    )
    payments = tuple(bad_debt_payment(b) for b in (m["bad_debt_payments"] or ()))
    mandates = tuple(
        MandateState(payment_method_id=x[0], type=x[1], status=x[2], status_reason=x[3], is_default=x[4],
                     card_brand=x[5], card_last4=x[6], exp_month=x[7], exp_year=x[8])
        for x in (m["mandates"] or ())
    )
    snapshot = Snapshot(
        account_id=m["account_id"],
        stored=stored,
        stored_bad_debt_flag=bool(m["bad_debt"]),
        invoices=invoices,
        attempts=attempts,
        payment_methods=methods,
        default_payment_method_id=customer_state[0],
        default_payment_method_changed_at=_t(customer_state[1]),
        customer_defaults=customer_defaults,
        subscriptions=subscriptions,
        retries=retries,
        bad_debt_payments=payments,
        payments_elsewhere=tuple(bad_debt_payment(b) for b in (m["payments_elsewhere"] or ())),
        stored_mandates=mandates,
        open_stuck_events=int(m["stuck"]),
        open_episode_entered_at=m["episode_entered_at"],
        stored_changed_at=decided_at,
    )
    return snapshot, version


def _prepare(conn: Connection) -> None:
    # info lives as long as the DBAPI connection, exactly like the prepared statement.
    info = conn.connection.info
    if not info.get(PREPARED_FLAG):
        conn.exec_driver_sql(PREPARE_SQL)
        info[PREPARED_FLAG] = True


def gather_many(conn: Connection, account_ids: Sequence[str]) -> dict[str, tuple[Snapshot, int]]:
    _prepare(conn)
    # The DBAPI cursor directly: SQLAlchemy would rebuild result metadata for these ~30 columns on
    # every call, which cost as much as building the snapshot (this runs once per recompute).
    with conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(EXECUTE_SQL, {"ids": list(account_ids)})
        names = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
    out = {}
    for row in rows:
        snapshot, version = snapshot_from_row(dict(zip(names, row, strict=True)))
        out[snapshot.account_id] = (snapshot, version)
    return out


def gather(conn: Connection, account_id: str) -> tuple[Snapshot, int] | None:
    return gather_many(conn, [account_id]).get(account_id)
