"""PaymentFailed for failures a recompute sees together: each failed payment is announced once.

Stripe renews a customer's subscriptions at the same anchor, so two invoices can be declined within
minutes; their webhooks come in one burst and the recompute requests coalesce, so one recompute
first sees both failures. Announcing only the latest lost the other for good (the next recompute
compares with the latest, stored)."""

from dataclasses import replace

from app.domain.compute import compute
from app.domain.events import derive_events
from app.domain.snapshot import Subscription
from tests.unit.builders import NOW, attempt, invoice, policy, snapshot

POLICY = policy()
SUBS = (Subscription("sub_1", "active", ("prod_core",)), Subscription("sub_2", "active", ("prod_other",)),
        Subscription("sub_3", "active", ("prod_third",)))


def failed(snap, stored=None):
    decision = compute(replace(snap, stored=stored), POLICY, NOW)
    return decision, [e.payload() for e in derive_events(stored, decision, NOW) if e.name == "PaymentFailed"]


def test_two_failures_first_seen_together_are_each_announced_oldest_first_with_their_own_class():
    a = invoice("in_a", failed_days_ago=1)
    b = invoice("in_b", failed_days_ago=0.99, sub="sub_2", product="prod_other", amount=3000)
    attempts = (attempt("pi_b", "in_b", days_ago=0.99, decline="expired_card"), attempt("pi_a", "in_a", days_ago=1))
    decision, announced = failed(snapshot(a, b, attempts=attempts, subscriptions=SUBS))
    assert announced == [{"attempt_id": "pi_a", "failure_class": "transient"},
                         {"attempt_id": "pi_b", "failure_class": "permanent"}]
    # and not again
    assert failed(snapshot(a, b, attempts=attempts, subscriptions=SUBS), stored=decision.state)[1] == []


def test_failures_seen_together_in_a_dunning_announce_only_those_newer_than_the_last_announced():
    a = invoice("in_a", failed_days_ago=5)
    b = invoice("in_b", failed_days_ago=1, sub="sub_2", product="prod_other", amount=3000)
    c = invoice("in_c", failed_days_ago=0.98, sub="sub_3", product="prod_third", amount=2000)
    first = (attempt("pi_a", "in_a", days_ago=5),)
    before, announced = failed(snapshot(a, attempts=first, subscriptions=SUBS))
    assert [p["attempt_id"] for p in announced] == ["pi_a"]
    together = (*first, attempt("pi_c", "in_c", days_ago=0.98, decline="authentication_required"),
                attempt("pi_b", "in_b", days_ago=1))
    _, announced = failed(snapshot(a, b, c, attempts=together, subscriptions=SUBS), stored=before.state)
    assert announced == [{"attempt_id": "pi_b", "failure_class": "transient"},
                         {"attempt_id": "pi_c", "failure_class": "action_required"}]
