from dataclasses import replace
from datetime import timedelta

import pytest

from app.domain.attempts import attempts_by_invoice
from app.domain.billing_history import Label, history, label
from app.domain.compute import compute
from app.domain.events import derive_events
from app.domain.snapshot import BadDebtPayment, Charge
from app.domain.state import DunningState
from tests.unit.builders import (
    NOW,
    attempt,
    days,
    declined_bad_debt_payment,
    invoice,
    policy,
    snapshot,
    two_invoices_in_bad_debt,
)

POLICY = policy()


def names(events) -> list[str]:
    return [e.name for e in events]


def test_entering_dunning_emits_entered_failed_escalated_and_entitlements():
    snap = snapshot(invoice(failed_days_ago=1), attempts=(attempt("pi_1", "in_1", days_ago=1),))
    decision = compute(snap, POLICY, NOW)
    events = derive_events(None, decision, NOW)
    assert names(events) == ["DunningEntered", "PaymentFailed", "ConsequenceEscalated", "EntitlementsChanged"]
    assert events[1].payload() == {"attempt_id": "pi_1", "failure_class": "transient"}


def test_no_change_no_event():
    snap = snapshot(invoice(failed_days_ago=1), attempts=(attempt("pi_1", "in_1", days_ago=1),))
    decision = compute(snap, POLICY, NOW)
    assert derive_events(decision.state, decision, NOW) == []


def test_bad_debt_entry_and_exit_carry_reason_products_and_duration():
    snap = snapshot(invoice(status="uncollectible", failed_days_ago=3))
    entered = compute(snap, POLICY, NOW)
    before = DunningState(status="past_due", level="limited", unpaid_since=days(3))
    events = derive_events(before, entered, NOW)
    assert "BadDebtEntered" in names(events) and "CancellationRequested" in names(events)
    bad = next(e for e in events if e.name == "BadDebtEntered")
    assert bad.payload() == {"reason": "marked_uncollectible", "failure_class": "unknown", "products": ["prod_core"]}
    # the cancellation names its episode: entered now, or when the open episode began (back from lifting)
    cancel = next(e for e in events if e.name == "CancellationRequested")
    assert cancel.payload()["episode"] == NOW.isoformat()
    lifting = replace(before, status="lifting")
    again = next(e for e in derive_events(lifting, entered, NOW, bad_debt_entered_at=days(2))
                 if e.name == "CancellationRequested")
    assert again.payload()["episode"] == days(2).isoformat()

    paid = replace(invoice(status="paid", failed_days_ago=3), paid_at=NOW)
    exited = compute(replace(snapshot(paid), stored=entered.state), POLICY, NOW + timedelta(hours=5))
    events = derive_events(entered.state, exited, NOW + timedelta(hours=5), bad_debt_entered_at=NOW)
    assert names(events)[:3] == ["ConsequenceEased", "BadDebtExited", "DunningResolved"]
    assert events[1].payload() == {"how": "paid", "duration_seconds": 5 * 3600}



def recomputes(snaps, stored=None):
    """Each snapshot recomputed with the previous state stored: the PaymentFailed payloads of each."""
    out = []
    for snap in snaps:
        decision = compute(replace(snap, stored=stored), POLICY, NOW)
        out.append([e.payload() for e in derive_events(stored, decision, NOW) if e.name == "PaymentFailed"])
        stored = decision.state
    return out


def test_each_failed_retry_on_the_same_intent_is_a_payment_failed():
    # Stripe retries an invoice on the same PaymentIntent: one attempt row (the intent) carries
    # every charge, its codes those of the latest.
    first = attempt("pi_1", "in_1", days_ago=3, charges=(Charge("ch_1", "pm_1", days(3)),))
    second = replace(first, attempted_at=days(1), decline_code="expired_card",
                     charges=(*first.charges, Charge("ch_2", "pm_1", days(1))))
    retried = replace(invoice(failed_days_ago=3), attempt_count=2, last_failed_at=days(1))
    steps = recomputes([snapshot(invoice(failed_days_ago=3), attempts=(first,)),
                        snapshot(retried, attempts=(second,)),
                        snapshot(retried, attempts=(second,))])
    assert steps == [[{"attempt_id": "pi_1", "failure_class": "transient"}],
                     [{"attempt_id": "pi_1", "failure_class": "permanent"}],
                     []]


def test_more_events_about_one_failure_announce_it_once():
    # The intent's event comes first (its charge at the event's time), the charge's own event later
    # with the charge's exact, earlier time; then the intent is cancelled (its time moves, no charge).
    by_intent = attempt("pi_1", "in_1", days_ago=1, charges=(Charge("ch_1", "pm_1", days(1)),))
    by_charge = replace(by_intent, charges=(Charge("ch_1", "pm_1", days(1) - timedelta(seconds=2)),))
    cancelled = replace(by_charge, attempted_at=days(0.5))
    inv = invoice(failed_days_ago=1)
    steps = recomputes([snapshot(inv, attempts=(a,)) for a in (by_intent, by_charge, cancelled)])
    assert [len(s) for s in steps] == [1, 0, 0]


def test_an_older_failure_is_not_announced_again_when_a_newer_ones_invoice_is_paid():
    att_a, att_b = attempt("pi_a", "in_a", days_ago=5), attempt("pi_b", "in_b", days_ago=1)
    inv_a, inv_b = invoice("in_a", failed_days_ago=5), invoice("in_b", failed_days_ago=1, amount=3000)
    paid_b = replace(inv_b, status="paid", amount_paid=3000, amount_remaining=0, paid_at=days(0.5))
    steps = recomputes([snapshot(inv_a, attempts=(att_a,)),
                        snapshot(inv_a, inv_b, attempts=(att_a, att_b)),
                        snapshot(inv_a, paid_b, attempts=(att_a, att_b))])
    assert [[p["attempt_id"] for p in s] for s in steps] == [["pi_a"], ["pi_b"], []]
    # and a new failure of in_a after that is announced
    again = replace(att_a, attempted_at=days(0.1))
    assert recomputes([snapshot(inv_a, paid_b, attempts=(again, att_b))],
                      stored=compute(snapshot(inv_a, paid_b, attempts=(att_a, att_b)), POLICY, NOW).state) \
        == [[{"attempt_id": "pi_a", "failure_class": "transient"}]]


def test_a_stored_plain_attempt_id_is_not_announced_again_after_the_upgrade():
    """Rows written before last_failure_id carried the failure's time hold a plain attempt id."""
    att_a, att_b = attempt("pi_a", "in_a", days_ago=5), attempt("pi_b", "in_b", days_ago=1)
    inv_a, inv_b = invoice("in_a", failed_days_ago=5), invoice("in_b", failed_days_ago=1, amount=3000)
    paid_b = replace(inv_b, status="paid", amount_paid=3000, amount_remaining=0, paid_at=days(0.5))

    def first_run(stored_id, *snap_args, attempts):
        snap = snapshot(*snap_args, attempts=attempts)
        # A row from before announced_failures was kept (NULL): last_failure_id was the latest announced.
        old = replace(compute(snap, POLICY, NOW).state, last_failure_id=stored_id, announced_failures=None)
        return recomputes([snap], stored=old)[0]

    assert first_run("pi_b", inv_a, inv_b, attempts=(att_a, att_b)) == []  # the same failure
    assert first_run("pi_b", inv_a, paid_b, attempts=(att_a, att_b)) == []  # an older one
    assert first_run("pi_a", inv_a, inv_b, attempts=(att_a, att_b)) == [  # a newer one
        {"attempt_id": "pi_b", "failure_class": "transient"}]
    assert first_run("pi_gone", inv_a, attempts=(att_a,)) == [  # the stored one unknown: older
        {"attempt_id": "pi_a", "failure_class": "transient"}]


def test_payment_failed_carries_the_class_of_its_own_failure():
    # in_x's charge was declined expired_card (permanent); in_y's invoice.payment_failed came after,
    # its charge's detail not yet in: the account's class is unknown, pi_x's failure is permanent.
    inv_x, inv_y = invoice("in_x", failed_days_ago=3), invoice("in_y", failed_days_ago=1, amount=4000)
    decision = compute(snapshot(inv_x, inv_y, attempts=(attempt("pi_x", "in_x", days_ago=3, decline="expired_card"),)),
                       POLICY, NOW)
    assert decision.state.failure_class == "unknown"
    failed = [e.payload() for e in derive_events(None, decision, NOW) if e.name == "PaymentFailed"]
    assert failed == [{"attempt_id": "pi_x", "failure_class": "permanent"}]


@pytest.mark.parametrize(
    ("inv", "attempts", "expected"),
    [
        (invoice(status="paid", failed_days_ago=None), (), Label.PAID),
        (invoice(status="void", failed_days_ago=3), (), Label.RESOLVED),
        (invoice(status="uncollectible", failed_days_ago=3), (), Label.UNCOLLECTIBLE),
        (invoice(failed_days_ago=3), (), Label.PAST_DUE),
        (invoice(failed_days_ago=None), (), Label.OPEN),
        # credited / paid out of band: closed without the customer paying in full
        (replace(invoice(status="paid", failed_days_ago=None), amount_paid=0, credited_amount=5000), (),
         Label.RESOLVED),
        (replace(invoice(status="paid", failed_days_ago=None), amount_paid=1000), (), Label.RESOLVED),
        # fully refunded: the money went back
        (invoice(status="paid", failed_days_ago=None),
         (attempt("pi_1", "in_1", days_ago=1, status="succeeded", amount=5000, amount_refunded=5000),), Label.RESOLVED),
        (invoice(status="paid", failed_days_ago=None),
         (attempt("pi_1", "in_1", days_ago=1, status="succeeded", amount=5000, amount_refunded=100),), Label.PAID),
        # paid, then credited in full by a credit note (to the customer's balance): not the customer's money
        (replace(invoice(status="paid", failed_days_ago=None), credited_amount=5000), (), Label.RESOLVED),
        (replace(invoice(status="paid", failed_days_ago=None), credited_amount=1000), (), Label.PAID),
        # a credit note that refunded: counted once, not as credit plus refund
        (replace(invoice(status="paid", failed_days_ago=None), credited_amount=2500),
         (attempt("pi_1", "in_1", days_ago=1, status="succeeded", amount=5000, amount_refunded=2500),), Label.PAID),
    ],
)
def test_billing_history_labels(inv, attempts, expected):
    assert label(inv, attempts, NOW) == expected


def test_open_invoice_past_due_date_is_labelled_past_due():
    inv = invoice(failed_days_ago=None, due_date=days(1))
    assert label(inv, (), NOW) == Label.PAST_DUE
    assert label(inv, (), days(2)) == Label.OPEN


def test_an_invoice_not_due_yet_is_open_though_an_early_payment_failed():
    inv = invoice(failed_days_ago=2, due_date=NOW + timedelta(days=5))
    assert label(inv, [attempt("pi_1", "in_1", days_ago=2)], NOW) == Label.OPEN
    assert label(inv, [attempt("pi_1", "in_1", days_ago=2)], NOW + timedelta(days=6)) == Label.PAST_DUE


def test_a_bad_debt_payments_decline_filed_under_an_invoice_is_no_failure_or_attempt_of_it():
    """The billing history labels what happened to each invoice: a failed bad-debt payment's intent,
    filed by _owner under a newer open invoice that is no debt, neither makes it past due nor counts
    as its attempt."""
    a, b, first = two_invoices_in_bad_debt()
    c = replace(invoice("in_c", failed_days_ago=None, sub="sub_2", product="prod_other"), created=days(1))
    declined, payment = declined_bad_debt_payment(days_ago=0.01)
    snap = snapshot(a, b, c, attempts=(*first, declined), bad_debt_payments=(payment,))
    assert "pi_bd" in [x.id for x in attempts_by_invoice(snap)["in_c"]]  # filed there
    rows = {row.invoice.id: (row.label, row.attempts) for row in history(snap, NOW)}
    assert rows == {"in_c": (Label.OPEN, 0), "in_b": (Label.PAST_DUE, 1), "in_a": (Label.PAST_DUE, 1)}


def test_a_refunded_bad_debt_payment_still_resolves_the_invoice_it_paid():
    """Its intent is no attempt of the invoice, but the money it paid went back: Resolved, not Paid."""
    paid = replace(invoice(status="paid", failed_days_ago=40), paid_at=days(3))
    refunded = attempt("pi_bd", None, days_ago=3, status="succeeded", amount=5000, amount_refunded=5000)
    payment = BadDebtPayment(id=1, state="succeeded", amount=5000, created_at=days(3), updated_at=days(3),
                             stripe_payment_intent_id="pi_bd")
    [row] = history(snapshot(paid, attempts=(refunded,), bad_debt_payments=(payment,)), NOW)
    assert (row.label, row.attempts) == (Label.RESOLVED, 0)


def test_a_failed_bad_debt_payment_is_announced_with_its_own_class():
    """The bad-debt payment's intent is no attempt of the invoice (its decline does not change the
    invoice's failure class or plan retries), but its decline is a failed payment: PaymentFailed,
    once, with that decline's class."""
    inv = invoice(failed_days_ago=40, attempt_count=8)
    first = attempt("pi_1", "in_1", days_ago=40, decline="expired_card")
    declined = attempt("pi_bd", None, days_ago=0.01, decline="insufficient_funds", amount=5000)
    payment = BadDebtPayment(id=1, state="failed", amount=5000, created_at=days(0.02), updated_at=days(0.01),
                             failure_reason="insufficient_funds", stripe_payment_intent_id="pi_bd")
    steps = recomputes([snapshot(inv, attempts=(first,)),
                        snapshot(inv, attempts=(first, declined), bad_debt_payments=(payment,)),
                        snapshot(inv, attempts=(first, declined), bad_debt_payments=(payment,))])
    assert steps == [[{"attempt_id": "pi_1", "failure_class": "permanent"}],
                     [{"attempt_id": "pi_bd", "failure_class": "transient"}],
                     []]
    decision = compute(snapshot(inv, attempts=(first, declined), bad_debt_payments=(payment,)), POLICY, NOW)
    assert decision.state.failure_class == "permanent" and decision.state.status == "bad_debt"


def test_a_failed_3ds_retry_on_a_reused_intent_is_announced_once():
    """Stripe retries the invoice on its intent; this time 3-D Secure fails and no charge is made, so
    the intent's charges still end with the earlier declined ch_1. The failure is timed by the event
    that reported it (failed_at), not by ch_1's time: announced, with its own class, once."""
    first = attempt("pi_1", "in_1", days_ago=3, charges=(Charge("ch_1", "pm_1", days(3)),))
    three_ds = replace(first, attempted_at=days(1), decline_code=None,
                       failure_code="payment_intent_authentication_failure", failed_at=days(1))
    retried = replace(invoice(failed_days_ago=3), attempt_count=2, last_failed_at=days(1))
    steps = recomputes([snapshot(invoice(failed_days_ago=3), attempts=(first,)),
                        snapshot(retried, attempts=(three_ds,)),
                        snapshot(retried, attempts=(replace(three_ds, attempted_at=days(0.5)),))])
    assert steps == [[{"attempt_id": "pi_1", "failure_class": "transient"}],
                     [{"attempt_id": "pi_1", "failure_class": "action_required"}],
                     []]
    # and a later charge on the intent is newer again
    charged = replace(three_ds, charges=(*first.charges, Charge("ch_2", "pm_1", days(0.2))),
                      decline_code="expired_card", failure_code="card_declined")
    assert recomputes([snapshot(retried, attempts=(charged,))],
                      stored=compute(snapshot(retried, attempts=(three_ds,)), POLICY, NOW).state) \
        == [[{"attempt_id": "pi_1", "failure_class": "permanent"}]]


def test_a_chargeless_failure_is_announced_once_when_later_events_move_its_attempt():
    """A failed 3-D Secure made no charge: its time is the failure's report (failed_at), which later
    events about the intent (its cancellation) leave, where the attempt's own time moves."""
    failed = attempt("pi_1", "in_1", days_ago=1, decline=None, failure_code="payment_intent_authentication_failure",
                     failed_at=days(1))
    cancelled = replace(failed, attempted_at=days(0.5))
    inv = invoice(failed_days_ago=1)
    steps = recomputes([snapshot(inv, attempts=(failed,)), snapshot(inv, attempts=(cancelled,))])
    assert steps == [[{"attempt_id": "pi_1", "failure_class": "action_required"}], []]
    assert compute(snapshot(inv, attempts=(cancelled,)), POLICY, NOW).state.last_failure_id == \
        f"pi_1@{days(1).isoformat()}"


def test_bad_debt_voided_after_a_newer_invoice_was_paid_is_resolved_as_its_label_says():
    """In bad debt for in_a, the customer pays a newer failed invoice (still bad debt: in_a is
    unpaid), then in_a is voided. The void ended it: BadDebtExited and DunningResolved say
    "resolved", as in_a's billing-history label does, not "paid" for the other invoice's payment."""
    in_a, _, (failed_a, _) = two_invoices_in_bad_debt()
    newer = replace(invoice("in_new", failed_days_ago=2), created=days(3))
    in_debt = compute(snapshot(in_a, newer, attempts=(failed_a, attempt("pi_n", "in_new", days_ago=2))),
                      POLICY, days(1.5))
    assert in_debt.state.status == "bad_debt"
    newer_paid = replace(newer, status="paid", amount_paid=5000, amount_remaining=0, paid_at=days(1))
    paid_by_card = attempt("pi_n", "in_new", days_ago=1, status="succeeded", amount=5000)
    still = compute(replace(snapshot(in_a, newer_paid, attempts=(failed_a, paid_by_card)), stored=in_debt.state),
                    POLICY, days(0.9))
    assert still.state.status == "bad_debt"
    voided = replace(in_a, status="void", amount_remaining=0, voided_at=days(0.1))
    snap = snapshot(voided, newer_paid, attempts=(failed_a, paid_by_card))
    after = compute(replace(snap, stored=still.state), POLICY, NOW)
    events = {e.name: e.payload() for e in derive_events(still.state, after, NOW, days(1.5))}
    assert events["BadDebtExited"] == {"how": "resolved", "duration_seconds": 36 * 3600}
    assert events["DunningResolved"] == {"how": "resolved"}
    assert {row.invoice.id: row.label for row in history(snap, NOW)} == {"in_a": Label.RESOLVED,
                                                                        "in_new": Label.PAID}


def test_a_dunning_paid_in_full_by_the_customer_is_paid():
    """Every debt of the episode paid with the customer's money: "paid", as both labels say."""
    in_a, in_b, (failed_a, failed_b) = two_invoices_in_bad_debt()
    in_debt = compute(snapshot(in_a, in_b, attempts=(failed_a, failed_b)), POLICY, days(1))
    paid = [replace(i, status="paid", amount_paid=5000, amount_remaining=0, paid_at=days(0.5)) for i in (in_a, in_b)]
    cards = (attempt("pi_a", "in_a", days_ago=0.5, status="succeeded", amount=5000),
             attempt("pi_b", "in_b", days_ago=0.5, status="succeeded", amount=5000))
    snap = snapshot(*paid, attempts=cards)
    after = compute(replace(snap, stored=in_debt.state), POLICY, NOW)
    events = {e.name: e.payload() for e in derive_events(in_debt.state, after, NOW, days(1))}
    assert events["BadDebtExited"]["how"] == "paid" and events["DunningResolved"] == {"how": "paid"}
    assert {row.label for row in history(snap, NOW)} == {Label.PAID}


def dunning_voided_then_bad_debt_paid():
    """in_a (failed 20 days ago) voided in dunning while in_b (failed 38 days ago) stays unpaid; in_b
    then reaches bad debt (episode 10 days ago), and the customer pays it by card a day ago. -> (the
    bad-debt state, the snapshot after the payment)."""
    in_a, in_b, (_, failed_b) = two_invoices_in_bad_debt()
    in_a = replace(in_a, created=days(21), first_failed_at=days(20), last_failed_at=days(20))
    failed_a = attempt("pi_a", "in_a", days_ago=20, decline="expired_card")
    dunning = compute(snapshot(in_a, in_b, attempts=(failed_a, failed_b)), POLICY, days(19))
    voided = replace(in_a, status="void", amount_remaining=0, voided_at=days(18.5))
    still = compute(replace(snapshot(voided, in_b, attempts=(failed_a, failed_b)), stored=dunning.state),
                    POLICY, days(18))
    assert (dunning.state.status, still.state.status) == ("past_due", "past_due")
    in_debt = compute(replace(snapshot(voided, in_b, attempts=(failed_a, failed_b)), stored=still.state),
                      POLICY, days(10))
    assert in_debt.state.status == "bad_debt"
    paid_b = replace(in_b, status="paid", amount_paid=5000, amount_remaining=0, paid_at=days(1))
    card = attempt("pi_b2", "in_b", days_ago=1, status="succeeded", amount=5000)
    return in_debt.state, snapshot(voided, paid_b, attempts=(failed_a, failed_b, card))


def test_a_bad_debt_the_customer_paid_exits_paid_though_an_earlier_dunning_invoice_was_voided():
    """The void came before the bad debt began: the customer's card ended the bad debt (BadDebtExited
    "paid", as in_b's label says), while the dunning as a whole closed a debt unpaid (DunningResolved
    "resolved"). Before, the void made BadDebtExited (and the bad-debt report) say "resolved" too."""
    in_debt, snap = dunning_voided_then_bad_debt_paid()
    after = compute(replace(snap, stored=in_debt, open_episode_entered_at=days(10)), POLICY, NOW)
    events = {e.name: e.payload() for e in derive_events(in_debt, after, NOW, days(10))}
    assert events["BadDebtExited"] == {"how": "paid", "duration_seconds": 10 * 24 * 3600}
    assert events["DunningResolved"] == {"how": "resolved"}
    assert {row.invoice.id: row.label for row in history(snap, NOW)} == {"in_a": Label.RESOLVED,
                                                                        "in_b": Label.PAID}


def test_a_bad_debt_paid_just_before_its_episode_was_recorded_exits_paid():
    """in_b paid by card a moment before the recompute that opened the episode (its webhook came
    late): the debt the bad debt was for is still the episode's, and it was paid."""
    in_debt, snap = dunning_voided_then_bad_debt_paid()
    after = compute(replace(snap, stored=in_debt, open_episode_entered_at=days(0.5)), POLICY, NOW)
    events = {e.name: e.payload() for e in derive_events(in_debt, after, NOW, days(0.5))}
    assert events["BadDebtExited"]["how"] == "paid"


def test_a_dunning_paid_in_full_is_paid_though_a_late_failure_backdates_it_over_an_earlier_void():
    """Dunning 1: in_a fails and is voided; the account is current again (DunningResolved "resolved").
    in_b had failed before that void, but its invoice.payment_failed came three days late (Stripe
    retries a delivery for days): the mirror dates the failure by the event (first_failed_at), so
    dunning 2, entered when it came, is unpaid since before in_a's void. The customer pays in_b in
    full: dunning 2 is "paid", as in_b's label says; in_a's void was dunning 1's, already announced."""
    in_a = replace(invoice("in_a", failed_days_ago=10), created=days(11))
    failed_a = attempt("pi_a", "in_a", days_ago=10)
    dunning_1 = compute(snapshot(in_a, attempts=(failed_a,)), POLICY, days(9.9))
    assert dunning_1.state.status == "past_due"
    voided = replace(in_a, status="void", amount_remaining=0, voided_at=days(5))
    in_b_open = replace(invoice("in_b", failed_days_ago=None), created=days(7))  # its failure not heard of yet
    closed = compute(replace(snapshot(voided, in_b_open, attempts=(failed_a,)), stored=dunning_1.state),
                     POLICY, days(4.9))
    assert closed.state.status == "current"
    assert {e.name: e.payload() for e in derive_events(dunning_1.state, closed, days(4.9))}["DunningResolved"] \
        == {"how": "resolved"}
    in_b = replace(invoice("in_b", failed_days_ago=6), created=days(7))
    failed_b = attempt("pi_b", "in_b", days_ago=6)
    dunning_2 = compute(replace(snapshot(voided, in_b, attempts=(failed_a, failed_b)), stored=closed.state),
                        POLICY, days(3))
    assert voided.voided_at is not None
    assert dunning_2.state.status == "past_due" and dunning_2.state.unpaid_since == days(6) < voided.voided_at
    paid_b = replace(in_b, status="paid", amount_paid=5000, amount_remaining=0, paid_at=days(1))
    card = replace(failed_b, status="succeeded", attempted_at=days(1), decline_code=None, amount=5000)
    snap = snapshot(voided, paid_b, attempts=(failed_a, card))
    after = compute(replace(snap, stored=dunning_2.state), POLICY, NOW)
    assert after.state.status == "current"
    assert {e.name: e.payload() for e in derive_events(dunning_2.state, after, NOW)}["DunningResolved"] \
        == {"how": "paid"}
    assert {row.invoice.id: row.label for row in history(snap, NOW)} == {"in_a": Label.RESOLVED, "in_b": Label.PAID}


def test_a_void_seen_with_the_new_failure_at_once_is_this_dunnings_debt():
    """in_a fails and is voided while in_b has failed too, and one recompute (coalesced events, or the
    sweep after a dead one) sees all of it while the account was current: no decision ever said
    in_a's dunning ended, so its void is this dunning's. The customer then pays in_b: "resolved"
    (in_a was voided, not paid), as before prior_settled_at; that mark comes from the last decision
    in current, not from the snapshot that enters dunning."""
    current = compute(snapshot(), POLICY, days(12)).state
    assert current.status == "current"
    in_a = replace(invoice("in_a", failed_days_ago=10), created=days(11))
    failed_a = attempt("pi_a", "in_a", days_ago=10)
    voided = replace(in_a, status="void", amount_remaining=0, voided_at=days(5))
    in_b = replace(invoice("in_b", failed_days_ago=6), created=days(7))
    failed_b = attempt("pi_b", "in_b", days_ago=6)
    entered = compute(replace(snapshot(voided, in_b, attempts=(failed_a, failed_b)), stored=current), POLICY, days(3))
    assert entered.state.status == "past_due"
    paid_b = replace(in_b, status="paid", amount_paid=5000, amount_remaining=0, paid_at=days(1))
    card = replace(failed_b, status="succeeded", attempted_at=days(1), decline_code=None, amount=5000)
    after = compute(replace(snapshot(voided, paid_b, attempts=(failed_a, card)), stored=entered.state), POLICY, NOW)
    assert after.state.status == "current"
    assert {e.name: e.payload() for e in derive_events(entered.state, after, NOW)}["DunningResolved"] \
        == {"how": "resolved"}
    assert after.state.prior_settled_at == days(1)  # current: the latest settled debt, for the next dunning
