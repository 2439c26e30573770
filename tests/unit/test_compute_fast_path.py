"""compute's shortcut for accounts with nothing that can be unpaid decides exactly what the full
computation decides: generated snapshots of every shape, compared field by field (reasons included)."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain.compute import _compute_full, _may_be_unpaid, compute
from app.domain.snapshot import (
    Attempt,
    BadDebtPayment,
    Invoice,
    InvoiceLine,
    PaymentMethod,
    Retry,
    Snapshot,
    Subscription,
)
from app.domain.state import DunningState
from tests.unit.builders import NOW, policy

POLICY = policy()
PRODUCTS = st.sampled_from(["prod_core", "prod_premium", "prod_addon"])
WHEN = st.integers(min_value=-5 * 24 * 60, max_value=90 * 24 * 60).map(lambda m: NOW - timedelta(minutes=m))
MAYBE_WHEN = st.none() | WHEN
INVOICE_IDS = st.sampled_from(["in_1", "in_2", "in_3"])
METHOD_IDS = st.sampled_from(["pm_1", "pm_2", "pm_3"])

invoices = st.builds(
    Invoice, id=INVOICE_IDS, status=st.sampled_from(["paid", "void", "draft", "open", "uncollectible", "weird"]),
    billing_reason=st.sampled_from(["subscription_cycle", "subscription_update", None]),
    subscription_id=st.sampled_from(["sub_1", "sub_2", None]), amount_due=st.sampled_from([0, 5000]),
    amount_paid=st.sampled_from([0, 2500, 5000]), amount_remaining=st.sampled_from([0, 0, 0, 300, 5000]),
    created=WHEN, lines=st.lists(st.builds(InvoiceLine, product=PRODUCTS, amount=st.sampled_from([-100, 5000])),
                                 max_size=2).map(tuple),
    attempt_count=st.integers(0, 9), due_date=MAYBE_WHEN, first_failed_at=MAYBE_WHEN, paid_at=MAYBE_WHEN,
    voided_at=MAYBE_WHEN,
)
attempts = st.builds(
    Attempt, id=st.sampled_from(["pi_1", "pi_2", "pi_3", "pi_4"]), invoice_id=st.none() | INVOICE_IDS,
    payment_method_id=st.none() | METHOD_IDS, status=st.sampled_from(["failed", "succeeded", "pending", "refunded"]),
    attempted_at=WHEN, amount=st.just(5000), amount_refunded=st.sampled_from([0, 5000]),
    decline_code=st.sampled_from([None, "insufficient_funds", "stolen_card", "authentication_required"]),
)
methods = st.builds(PaymentMethod, id=METHOD_IDS, type=st.just("card"), attached=st.booleans(), changed_at=WHEN,
                    exp_month=st.none() | st.integers(1, 12), exp_year=st.none() | st.sampled_from([2025, 2027]))
subscriptions = st.builds(Subscription, id=st.sampled_from(["sub_1", "sub_2"]),
                          status=st.sampled_from(["active", "past_due", "canceled", "incomplete_expired", "incomplete",
                                                  "paused"]),
                          products=st.lists(PRODUCTS, max_size=3).map(tuple))
retries = st.builds(Retry, invoice_id=INVOICE_IDS, payment_method_id=st.none() | METHOD_IDS,
                    retry_number=st.integers(1, 4), free=st.booleans(),
                    state=st.sampled_from(["dispatched", "charging", "sent", "skipped", "failed"]),
                    scheduled_for=WHEN, created_at=WHEN)
payments = st.builds(BadDebtPayment, id=st.integers(1, 3), state=st.sampled_from(["pending", "succeeded", "failed"]),
                     amount=st.just(5000), created_at=WHEN, updated_at=WHEN)
stored = st.none() | st.builds(DunningState, status=st.sampled_from(["current", "past_due", "bad_debt", "lifting"]),
                               level=st.sampled_from(["none", "notice", "suspended"]), unpaid_since=MAYBE_WHEN)
snapshots = st.builds(
    Snapshot, account_id=st.just("acct_1"), stored=stored, stored_bad_debt_flag=st.booleans(),
    invoices=st.lists(invoices, max_size=3).map(tuple), attempts=st.lists(attempts, max_size=4).map(tuple),
    payment_methods=st.lists(methods, max_size=2).map(tuple), default_payment_method_id=st.none() | METHOD_IDS,
    default_payment_method_changed_at=MAYBE_WHEN, subscriptions=st.lists(subscriptions, max_size=2).map(tuple),
    retries=st.lists(retries, max_size=3).map(tuple), bad_debt_payments=st.lists(payments, max_size=2).map(tuple),
)


@settings(max_examples=1500, deadline=None)
@given(snapshot=snapshots, minutes=st.integers(-60, 60))
def test_compute_decides_what_the_full_computation_decides(snapshot: Snapshot, minutes: int):
    now = NOW + timedelta(minutes=minutes)
    fast = compute(snapshot, POLICY, now)
    full = _compute_full(snapshot, POLICY, now)
    assert fast == full
    assert fast.assessments == full.assessments  # not part of Decision equality
    assert fast.state.reasons == full.state.reasons


def test_the_generator_reaches_both_paths():
    shortcut = full = 0

    # derandomized: with random draws "full" landed near 20 and the count failed now and then
    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(snapshot=snapshots)
    def count(snapshot: Snapshot) -> None:
        nonlocal shortcut, full
        if any(_may_be_unpaid(i) for i in snapshot.invoices):
            full += 1
        elif snapshot.invoices and snapshot.payment_methods:
            shortcut += 1

    count()
    assert shortcut > 20 and full > 20


def test_shared_plain_decisions_follow_the_policy_version_and_the_subscriptions():
    """The shortcut shares one decision per (policy version, subscriptions' status and products):
    a different version or other products must never get another key's decision."""
    from dataclasses import replace

    from app.domain import compute as compute_module

    core = Snapshot(account_id="acct_1", stored=None,
                    subscriptions=(Subscription(id="sub_1", status="active", products=("prod_core",)),))
    premium = replace(core, subscriptions=(Subscription(id="sub_9", status="active", products=("prod_premium",)),))
    canceled = replace(core, subscriptions=(Subscription(id="sub_1", status="canceled", products=("prod_core",)),))
    other_version = replace(POLICY, version=POLICY.version + "-next")
    for snapshot, pol in ((core, POLICY), (premium, POLICY), (canceled, POLICY), (core, other_version),
                          (replace(core, account_id="acct_2"), POLICY)):
        for _ in range(2):  # the second time from the shared decisions
            assert compute(snapshot, pol, NOW) == _compute_full(snapshot, pol, NOW)
    assert compute(core, POLICY, NOW).state.policy_version == POLICY.version
    assert compute(core, other_version, NOW).state.policy_version == other_version.version
    assert compute(core, POLICY, NOW) is compute(replace(core, account_id="acct_2"), POLICY, NOW)
    # bounded: memory stays flat whatever the number of distinct keys
    for n in range(compute_module.PLAIN_CACHE_SIZE + 10):
        many = replace(core, subscriptions=(Subscription(id="s", status="active", products=(f"prod_{n}",)),))
        assert compute(many, POLICY, NOW).state.entitlements["products"] == {f"prod_{n}": "full"}
    assert len(compute_module._PLAIN_DECISIONS) <= compute_module.PLAIN_CACHE_SIZE
    assert len(compute_module._PLAIN_STATES) <= compute_module.PLAIN_CACHE_SIZE
