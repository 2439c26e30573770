"""Properties of compute over generated snapshots and simulated dunning runs (DESIGN section 4).

The simulation drives one account the way the fleet does: Stripe's first attempt fails, beat
dispatches each retry compute plans when it is due (``POST /v1/invoices/<id>/pay`` confirms the
invoice's payment intent again, so every charge lands on the same attempt row, and Stripe's
attempt_count, which counts only its own automatic retries, stays 1), the customer adds cards,
changes the default or tries on the hosted invoice page, and each decision is stored before the
next one is made. Rules found broken by review have a concrete test beside the property.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.domain.compute import compute
from app.domain.decline_codes import classify
from app.domain.snapshot import Attempt, Charge, Invoice, InvoiceLine, PaymentMethod, Retry, Snapshot, Subscription
from app.domain.state import DunningState, FailureClass, Level, Status
from tests.unit.builders import NOW, attempt, days, invoice, method, policy, retry, snapshot

POLICY = policy()
SCHEDULE = (1, 3, 5, 7, 10, 14)


def rules(decision) -> list[str]:
    return [r.rule for r in decision.reasons]


def reused_intent(first_failed_days_ago: float, retry_days: tuple[int, ...], *extra: Charge) -> Attempt:
    """The invoice's one payment intent: its first charge and one charge per retry sent on day d of
    the schedule, on pm_1, each declined for insufficient funds; then ``extra`` charges."""
    start = days(first_failed_days_ago)
    charges = (Charge("ch_0", "pm_1", start),
               *(Charge(f"ch_d{d}", "pm_1", start + timedelta(days=d)) for d in retry_days), *extra)
    last = charges[-1]
    return attempt("pi_1", "in_1", days_ago=(NOW - last.charged_at).total_seconds() / 86400,
                   pm=last.payment_method_id or "pm_1", charges=charges)


def scheduled_retries(first_failed_days_ago: float, retry_days: tuple[int, ...]) -> tuple[Retry, ...]:
    return tuple(retry("in_1", n, days_ago=first_failed_days_ago - d, state="failed")
                 for n, d in enumerate(retry_days, 1))


# --- the per-invoice cap counts every charge of the invoice -------------------------------------


def test_free_retries_stop_at_the_per_invoice_cap_of_8_charges():
    """DESIGN 4: at most 8 attempts per invoice, whatever the policy says. Stripe confirms the
    invoice's intent again for each of our retries, and its attempt_count counts none of them (only
    its own automatic retries), so the invoice's charges are what the cap counts. Six scheduled
    retries and a free one on a new card make 8 charges: a third card earns no ninth."""
    free = Charge("ch_free", "pm_2", days(1))
    snap = snapshot(invoice(failed_days_ago=16, attempt_count=1),
                    attempts=(reused_intent(16, SCHEDULE, free),),
                    payment_methods=(method("pm_1", changed_days_ago=100), method("pm_2", changed_days_ago=1.01),
                                     method("pm_3", changed_days_ago=0.1)),
                    default_payment_method_id="pm_3", default_payment_method_changed_at=days(0.1),
                    retries=(*scheduled_retries(16, SCHEDULE),
                             retry("in_1", 7, days_ago=1, free=True, pm="pm_2", state="failed")))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.next_retry_at is None, decision.state
    assert "retry.cap_invoice" in rules(decision)


def test_a_lower_per_invoice_cap_in_the_policy_stops_the_schedule():
    """The policy may lower the per-invoice cap: with 4, the first charge and three retries on the
    reused intent are the invoice's 4 attempts, and no fourth retry is planned."""
    four = policy(max_attempts_per_invoice=4)
    snap = snapshot(invoice(failed_days_ago=8, attempt_count=1), attempts=(reused_intent(8, (1, 3, 5)),),
                    retries=scheduled_retries(8, (1, 3, 5)))
    decision = compute(snap, four, NOW)
    assert decision.state.next_retry_at is None, decision.state
    assert "retry.cap_invoice" in rules(decision)
    # one charge fewer: the next retry is still planned
    snap = snapshot(invoice(failed_days_ago=8, attempt_count=1), attempts=(reused_intent(8, (1, 3)),),
                    retries=scheduled_retries(8, (1, 3)))
    assert compute(snap, four, NOW).state.next_retry_at is not None


def test_a_retry_sent_whose_charge_is_not_mirrored_yet_counts_for_the_cap():
    """Our retries that reached Stripe are charges too, before their charge.failed arrives."""
    free = retry("in_1", 7, days_ago=1, free=True, pm="pm_2", state="sent")
    snap = snapshot(invoice(failed_days_ago=16, attempt_count=1), attempts=(reused_intent(16, SCHEDULE),),
                    payment_methods=(method("pm_1", changed_days_ago=100), method("pm_2", changed_days_ago=1.01),
                                     method("pm_3", changed_days_ago=0.1)),
                    default_payment_method_id="pm_3", default_payment_method_changed_at=days(0.1),
                    retries=(*scheduled_retries(16, SCHEDULE), free))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.next_retry_at is None and "retry.cap_invoice" in rules(decision)


# --- a simulated dunning run --------------------------------------------------------------------

T0 = NOW - timedelta(days=60)
DECLINES = st.sampled_from(["insufficient_funds", "insufficient_funds", "do_not_honor", "expired_card", "stolen_card",
                            "authentication_required", "a_code_stripe_adds_next_year"])
CUSTOMER = st.sampled_from(["wait", "wait", "wait", "new_card", "default_change", "hosted_page"])


class Run:
    """One account with one renewal invoice failed at T0 on pm_1, driven as the fleet drives it."""

    def __init__(self, first_decline: str) -> None:
        self.now = T0
        self.invoice = Invoice(id="in_1", status="open", billing_reason="subscription_cycle", subscription_id="sub_1",
                               amount_due=5000, amount_paid=0, amount_remaining=5000, created=T0 - timedelta(hours=1),
                               lines=(InvoiceLine("prod_core", 5000),), attempt_count=1, first_failed_at=T0,
                               last_failed_at=T0)
        self.charges = [Charge("ch_0", "pm_1", T0)]
        self.attempt = Attempt("pi_1", "in_1", "pm_1", "failed", T0, amount=5000, decline_code=first_decline,
                               charges=tuple(self.charges))
        self.methods = [PaymentMethod("pm_1", "card", True, T0 - timedelta(days=300))]
        self.default, self.default_at = "pm_1", T0 - timedelta(days=300)
        self.retries: list[Retry] = []
        self.stored: DunningState | None = None
        self.bad_debt = False
        self.episode: datetime | None = None
        self.customer_acted = False
        self.history: list[tuple] = []

    def snapshot(self) -> Snapshot:
        return Snapshot(account_id="acct_1", stored=self.stored, stored_bad_debt_flag=self.bad_debt,
                        invoices=(self.invoice,), attempts=(self.attempt,), payment_methods=tuple(self.methods),
                        default_payment_method_id=self.default, default_payment_method_changed_at=self.default_at,
                        subscriptions=(Subscription("sub_1", "active", ("prod_core",)),), retries=tuple(self.retries),
                        open_episode_entered_at=self.episode)

    def charge(self, method_id: str, decline: str) -> None:
        """A declined charge on the invoice's intent (invoice.payment_failed, charge.failed)."""
        self.charges.append(Charge(f"ch_{len(self.charges)}", method_id, self.now))
        self.attempt = replace(self.attempt, payment_method_id=method_id, attempted_at=self.now, decline_code=decline,
                               charges=tuple(self.charges))
        self.invoice = replace(self.invoice, last_failed_at=self.now)

    def recompute(self):
        decision = compute(self.snapshot(), POLICY, self.now)
        state = decision.state
        self.history.append((self.now - T0, state.status, state.level, state.next_retry_at, state.retry_free,
                             state.retry_payment_method_id))
        if self.stored is not None:
            # In bad debt only money gets the account out; none arrives in this run.
            assert not (self.stored.status == Status.BAD_DEBT and state.status != Status.BAD_DEBT), self.history
            # With nothing done by the customer, time alone never eases the consequences.
            assert self.customer_acted or Level(state.level).rank >= Level(self.stored.level).rank, self.history
        if decision.bad_debt and self.episode is None:
            self.episode = self.now
        self.stored, self.bad_debt = state, decision.bad_debt
        return decision

    def dispatch(self, decision, decline: str) -> None:
        """Beat sends the retry the decision planned; Stripe declines it."""
        state = decision.state
        method_id = state.retry_payment_method_id or self.default
        assert len(self.charges) < POLICY.attempts_per_invoice, self.history  # the per-invoice cap
        if not state.retry_free:
            last = classify(self.attempt.decline_code)
            # permanent and action_required: never again on the same method, unless a new one came
            assert last in (FailureClass.TRANSIENT, FailureClass.UNKNOWN) or method_id != self.attempt.payment_method_id
            transient = last == FailureClass.TRANSIENT
            schedule = POLICY.transient_schedule_days if transient else POLICY.unknown_schedule_days
            used = sum(1 for r in self.retries if r.counts)
            assert used < len(schedule) and self.now >= T0 + timedelta(days=schedule[used]), self.history
        self.retries.append(Retry("in_1", method_id, len(self.retries) + 1, state.retry_free, "failed",
                                  state.next_retry_at, self.now))
        self.charge(method_id, decline)


def beat_until(run: Any, decision: Any, until: datetime, decline: Callable[[], str]) -> Any:
    """Beat up to ``until``: each due retry is dispatched (Stripe declines it with ``decline()``) and
    each due retry or review moment recomputes. The run's clock ends at ``until``; the last decision."""
    while True:
        due = min((t for t in (decision.state.next_retry_at, decision.state.next_review_at) if t is not None),
                  default=None)
        if due is None or due > until:
            break
        run.now = max(run.now, due)
        if decision.state.next_retry_at is not None and decision.state.next_retry_at <= run.now:
            run.dispatch(decision, decline())
        decision = run.recompute()
    run.now = until
    return decision


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_simulated_dunning_run_keeps_every_retry_rule(data):
    """Retries keep the per-invoice cap and the schedule of their class (an expired card is not retried
    on the same card, insufficient funds on days 1, 3, 5, 7, 10, 14), a new card gets its free retry,
    bad debt stays until money comes, and time alone never eases the consequences."""
    run = Run(data.draw(DECLINES))
    decision = run.recompute()
    for _ in range(data.draw(st.integers(1, 25))):
        until = run.now + timedelta(minutes=data.draw(st.integers(1, 4 * 24 * 60)))
        decision = beat_until(run, decision, until, lambda: data.draw(DECLINES))
        action = data.draw(CUSTOMER)
        if action == "new_card":
            run.methods.append(PaymentMethod(f"pm_{len(run.methods) + 1}", "card", True, run.now))
            run.default, run.default_at = run.methods[-1].id, run.now
        elif action == "default_change" and len(run.methods) > 1:
            run.default, run.default_at = next(m.id for m in reversed(run.methods) if m.id != run.default), run.now
        elif action == "hosted_page":
            run.charge(run.default, data.draw(DECLINES))
        run.customer_acted = run.customer_acted or action != "wait"
        decision = run.recompute()
        if action == "new_card" and not decision.bad_debt and len(run.charges) < POLICY.attempts_per_invoice:
            assert decision.state.retry_free and decision.state.retry_payment_method_id == run.default, run.history
            assert decision.state.next_retry_at is not None and decision.state.next_retry_at <= run.now
        if run.now - T0 > timedelta(days=45):
            break


# --- a bank debit processing is a payment in flight until its outcome ----------------------------


def _exhausted_then_paying_by_bank_debit(first_failed_days_ago: float, debit_days_ago: float):
    """in_1 declined for want of funds, its six scheduled retries declined too; then the customer
    pays it on the hosted invoice page from a bank account (ACH or SEPA Direct Debit): Stripe confirms
    the invoice's intent again and it is ``processing`` for days (payment_intent.processing,
    charge.pending), mirrored as a pending attempt."""
    charges = (Charge("ch_0", "pm_1", days(first_failed_days_ago)),
               *(Charge(f"ch_d{d}", "pm_1", days(first_failed_days_ago - d)) for d in SCHEDULE),
               Charge("py_debit", "pm_bank", days(debit_days_ago)))
    debit = attempt("pi_1", "in_1", days_ago=debit_days_ago, status="pending", pm="pm_bank", charges=charges)
    return snapshot(invoice(failed_days_ago=first_failed_days_ago, attempt_count=1), attempts=(debit,),
                    payment_methods=(method("pm_1", changed_days_ago=100), method("pm_bank", changed_days_ago=100)),
                    retries=scheduled_retries(first_failed_days_ago, SCHEDULE))


def test_no_bad_debt_over_a_bank_debit_still_processing():
    """DESIGN 6: recompute never applies bad-debt consequences over a payment in flight. A bank
    debit is in flight until Stripe says how it ended (days: retry_cadence holds the invoice's
    retries that long), not only for the guard window: the account reaching its 21st day with its
    retries used up while the customer's debit processes must not be cancelled, to be paid days
    later. When its outcome is a failure, bad debt follows."""
    snap = _exhausted_then_paying_by_bank_debit(21.2, 0.5)
    decision = compute(snap, POLICY, NOW)
    assert decision.state.status == Status.PAST_DUE and not decision.bad_debt, decision.state
    assert decision.state.actions_requested == ()
    assert "guard.payment_in_flight" in rules(decision)
    assert compute(replace(snap, stored=decision.state), POLICY, NOW).state.changed_fields(decision.state) == []
    # the debit failed (payment_intent.payment_failed): bad debt now
    failed = replace(snap.attempts[0], status="failed", decline_code="insufficient_funds")
    declined = compute(replace(snap, attempts=(failed,), stored=decision.state), POLICY, NOW)
    assert declined.bad_debt and declined.state.actions_requested == ("cancel:sub_1",)


def test_an_upgrades_revert_waits_for_a_bank_debit_still_processing():
    """The same hold keeps an exhausted upgrade from being reverted while its debit processes."""
    snap = _exhausted_then_paying_by_bank_debit(21.2, 0.5)
    snap = replace(snap, invoices=(replace(snap.invoices[0], billing_reason="subscription_update"),))
    decision = compute(snap, POLICY, NOW)
    assert decision.state.actions_requested == () and "guard.revert_held" in rules(decision)
