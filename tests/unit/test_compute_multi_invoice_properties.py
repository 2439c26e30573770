"""Properties of compute over generated multi-invoice, multi-product accounts (DESIGN section 4).

Each generated account holds several invoices at once, each on its own subscription and products:
a renewal (``subscription_cycle``) of sub_core (prod_core, maybe prod_premium), an unpaid upgrade
(``subscription_update``) of sub_up with its proration credit line (a swap prod_basic -> prod_premium_analytics,
a new add-on, or a seat increase), an annual product's invoice already paid (sub_annual), maybe a small
balance (sub_small), and voided, uncollectible or paid others. Each unpaid one failed some days ago
with a decline code from app/domain/decline_codes.py and used some of its retries; the policy is
app/policy/default.toml. Nothing is in flight (every attempt and retry has its outcome) and nothing is
stored, so the rules of DESIGN 4 alone decide.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.domain.compute import compute
from app.domain.decline_codes import DECLINE_CODES, classify
from app.domain.snapshot import Attempt, Charge, Invoice, InvoiceLine, PaymentMethod, Retry, Snapshot, Subscription
from app.domain.state import Access, DunningState, FailureClass, Level, Status
from tests.unit.builders import NOW, days, policy
from tests.unit.test_compute_properties import beat_until

POLICY = policy()
# PROP_N / PROP_N_RUN raise the number of examples for a longer hunt (the unit suite keeps the defaults)
SETTINGS = settings(max_examples=int(os.environ.get("PROP_N", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
STATUS_RANK = {Status.CURRENT: 0, Status.PAST_DUE: 1, Status.LIFTING: 2, Status.BAD_DEBT: 2}


def _bad_debt_days() -> int:
    min_days = next(r.min_days for r in POLICY.rules if r.level == Level.SUSPENDED and r.retries_exhausted)
    assert min_days is not None
    return min_days


BAD_DEBT_DAYS = _bad_debt_days()

DECLINES = st.sampled_from([*sorted(DECLINE_CODES), "a_code_stripe_adds_next_year"])
AGES = st.one_of(st.floats(0.05, 60), st.sampled_from([2.99, 3.0, 6.99, 7.0, 13.99, 14.0, 20.99, 21.0, 21.01, 90.0]))


@dataclass(frozen=True)
class Unpaid:
    """One unpaid invoice to generate: its age (days since its first failure), the decline of its
    latest charge, retries used, amount, and whether it was marked uncollectible."""

    age: float
    decline: str
    retries: int
    amount: int
    uncollectible: bool
    # Stripe's own attempts (Smart Retries) beside ours, and whether our retries kept to the schedule
    stripe_attempts: int = 1
    off_schedule: tuple[float, ...] | None = None


REGULAR_AMOUNTS = st.integers(500, 50_000)


def unpaid_invoices(amounts: st.SearchStrategy[int] = REGULAR_AMOUNTS) -> st.SearchStrategy[Unpaid]:
    return st.builds(Unpaid, age=AGES, decline=DECLINES, retries=st.integers(0, 7), amount=amounts,
                     uncollectible=st.booleans(), stripe_attempts=st.sampled_from([1, 1, 1, 2, 4]),
                     off_schedule=st.none() | st.lists(st.floats(0.01, 1.0), max_size=7).map(tuple))


def _schedule_days(unpaid: Unpaid) -> list[float]:
    """When each retry was sent (days after the first failure): on the schedule of the class, and
    never after now."""
    if unpaid.off_schedule is not None:
        # a schedule that fell behind (a permanent decline, then a new card...): fractions of the age
        return sorted({round(f * unpaid.age, 3) for f in unpaid.off_schedule if 0 < f * unpaid.age < unpaid.age - 0.01})
    cls = classify(unpaid.decline)
    schedule = POLICY.unknown_schedule_days if cls == FailureClass.UNKNOWN else POLICY.transient_schedule_days
    return [d for d in schedule[:unpaid.retries] if d < unpaid.age - 0.01]


def build_invoice(inv_id: str, sub: str, lines: tuple[InvoiceLine, ...], unpaid: Unpaid, billing_reason: str,
                  pm: str = "pm_1") -> tuple[Invoice, Attempt, tuple[Retry, ...]]:
    """The invoice, its one payment intent (a charge per try, all declined) and our failed retries."""
    first = days(unpaid.age)
    sent = _schedule_days(unpaid)
    charges = (Charge(f"ch_{inv_id}_0", pm, first),
               *(Charge(f"ch_{inv_id}_{d}", pm, first + timedelta(days=d)) for d in sent))
    last = charges[-1].charged_at
    amount = unpaid.amount
    marked = unpaid.uncollectible and unpaid.age > 0.1
    inv = Invoice(
        id=inv_id, status="uncollectible" if marked else "open", billing_reason=billing_reason,
        subscription_id=sub, amount_due=amount, amount_paid=0, amount_remaining=amount,
        created=first - timedelta(hours=1), lines=lines, attempt_count=unpaid.stripe_attempts, first_failed_at=first,
        last_failed_at=last, marked_uncollectible_at=(first + timedelta(days=unpaid.age / 2)) if marked else None,
    )
    attempt = Attempt(f"pi_{inv_id}", inv_id, pm, "failed", last, amount=amount, decline_code=unpaid.decline,
                      charges=charges)
    retries = tuple(Retry(inv_id, pm, n, False, "failed", first + timedelta(days=d), first + timedelta(days=d))
                    for n, d in enumerate(sent, 1))
    return inv, attempt, retries


def settled_invoice(inv_id: str, sub: str, product: str, status: str, days_ago: float, amount: int = 12_000
                    ) -> Invoice:
    paid = status == "paid"
    at = days(days_ago)
    return Invoice(id=inv_id, status=status, billing_reason="subscription_cycle", subscription_id=sub,
                   amount_due=amount, amount_paid=amount if paid else 0, amount_remaining=0,
                   created=at - timedelta(hours=1), lines=(InvoiceLine(product, amount),),
                   paid_at=at if paid else None, voided_at=at if status == "void" else None)


UPGRADE_LINES = {
    # core plan swapped for a premium one on the same item
    "swap": (InvoiceLine("prod_basic", -2000, "si_up"), InvoiceLine("prod_premium_analytics", 6000, "si_up")),
    # an add-on bought: nothing credited
    "addon": (InvoiceLine("prod_addon", 3000, "si_addon"),),
    # more seats of the product already held
    "seats": (InvoiceLine("prod_seats", -1000, "si_seats"), InvoiceLine("prod_seats", 4000, "si_seats")),
}
UPGRADE_PRODUCTS = {"swap": ("prod_premium_analytics",), "addon": ("prod_seats", "prod_addon"),
                    "seats": ("prod_seats",)}


@dataclass(frozen=True)
class Account:
    snapshot: Snapshot
    upgrade: str | None  # the upgrade's kind, when it is unpaid

    @property
    def regular_unpaid(self) -> list[Invoice]:
        return [i for i in self.snapshot.invoices if i.status in ("open", "uncollectible") and not i.is_upgrade]


CURRENCIES = st.sampled_from(["usd", "eur", "krw"])  # krw: a threshold of its own (policy)


@st.composite
def accounts(draw: st.DrawFn, renewal: bool | None = None, upgrade: bool | None = None,
             small: bool | None = None, others: bool = True) -> Account:
    invoices: list[Invoice] = []
    attempts: list[Attempt] = []
    retries: list[Retry] = []
    core_products = draw(st.sampled_from([("prod_core",), ("prod_core", "prod_premium")]))
    subs = [Subscription("sub_core", "active", core_products), Subscription("sub_annual", "active", ("prod_annual",))]
    # the annual product, paid months ago
    invoices.append(settled_invoice("in_annual", "sub_annual", "prod_annual", "paid", draw(st.floats(1, 300))))
    # earlier renewals of sub_core: paid, voided
    for n, status in enumerate(draw(st.lists(st.sampled_from(["paid", "void"]), max_size=2))):
        invoices.append(settled_invoice(f"in_old{n}", "sub_core", "prod_core", status, 35 + 30 * n))
    if renewal if renewal is not None else draw(st.booleans()):
        unpaid = draw(unpaid_invoices())
        lines = tuple(InvoiceLine(p, unpaid.amount // len(core_products)) for p in core_products)
        built = build_invoice("in_cycle", "sub_core", lines, unpaid, "subscription_cycle")
        invoices.append(built[0])
        attempts.append(built[1])
        retries.extend(built[2])
    kind = None
    if upgrade if upgrade is not None else draw(st.booleans()):
        kind = draw(st.sampled_from([*sorted(UPGRADE_LINES), "core_swap"]))
        unpaid = draw(unpaid_invoices())
        if kind == "core_swap":
            # the renewal's own subscription moved from prod_core to prod_premium
            lines = (InvoiceLine("prod_core", -2000, "si_core"), InvoiceLine("prod_premium", 6000, "si_core"))
            sub = "sub_core"
            subs[0] = Subscription("sub_core", "active", ("prod_premium",))
        else:
            lines, sub = UPGRADE_LINES[kind], "sub_up"
            subs.append(Subscription("sub_up", "active", UPGRADE_PRODUCTS[kind]))
        built = build_invoice("in_up", sub, lines, replace(unpaid, amount=sum(ln.amount for ln in lines)),
                              "subscription_update")
        invoices.append(built[0])
        attempts.append(built[1])
        retries.extend(built[2])
    if small if small is not None else draw(st.booleans()):
        unpaid = draw(unpaid_invoices(st.integers(1, 499)))
        built = build_invoice("in_small", "sub_small", (InvoiceLine("prod_small", unpaid.amount),), unpaid,
                              "subscription_cycle")
        # maybe billed in another currency (an account's other Stripe customer): its balance is its own
        invoices.append(replace(built[0], currency=draw(CURRENCIES)))
        attempts.append(built[1])
        retries.extend(built[2])
        subs.append(Subscription("sub_small", "active", ("prod_small",)))
    if others and draw(st.booleans()):
        # a second renewal of sub_core, unpaid beside the first (a month later)
        unpaid = draw(unpaid_invoices())
        built = build_invoice("in_cycle2", "sub_core", (InvoiceLine("prod_core", unpaid.amount),), unpaid,
                              "subscription_cycle")
        invoices.append(built[0])
        attempts.append(built[1])
        retries.extend(built[2])
    if others and draw(st.booleans()):
        # sent for payment (the customer pays by invoice): debt from its due date, past or to come
        due = days(draw(st.floats(-20, 40)))
        amount = draw(st.integers(1, 20_000))
        invoices.append(Invoice(id="in_terms", status="open", billing_reason="subscription_cycle",
                                currency=draw(CURRENCIES), subscription_id="sub_terms", amount_due=amount,
                                amount_paid=0, amount_remaining=amount, created=min(due, NOW) - timedelta(days=30),
                                lines=(InvoiceLine("prod_terms", amount),), due_date=due))
        subs.append(Subscription("sub_terms", "active", ("prod_terms",)))
    if draw(st.booleans()):
        # Stripe linked some attempts to no invoice (API 2025-03-31)
        attempts = [replace(a, invoice_id=None) if draw(st.booleans()) else a for a in attempts]
    methods = [PaymentMethod("pm_1", "card", True, days(400))]
    default, default_at = "pm_1", days(400)
    if draw(st.booleans()):
        # a new card, added some days ago and made the default
        default, default_at = "pm_2", days(draw(st.floats(0.01, 30)))
        methods.append(PaymentMethod("pm_2", "card", True, default_at))
    snap = Snapshot(account_id="acct_1", stored=None, invoices=tuple(invoices), attempts=tuple(attempts),
                    payment_methods=tuple(methods), default_payment_method_id=default,
                    default_payment_method_changed_at=default_at, subscriptions=tuple(subs), retries=tuple(retries))
    return Account(snap, kind)


def products_of(snap: Snapshot, pred) -> set[str]:
    return {p for i in snap.invoices if pred(i) for p in i.products}


def unpaid_ids(decision) -> set[str]:
    return {a.invoice.id for a in decision.assessments}


def balances(decision) -> dict[str, int]:
    """The unpaid regular invoices' balance, per currency (amounts in two currencies do not add up)."""
    out: dict[str, int] = {}
    for a in decision.assessments:
        if not a.invoice.is_upgrade:
            out[a.invoice.currency] = out.get(a.invoice.currency, 0) + a.invoice.amount_remaining
    return out


# --- the properties -----------------------------------------------------------------------------


@SETTINGS
@given(account=accounts(renewal=False, upgrade=True, small=False, others=False))
def test_an_unpaid_upgrade_alone_never_makes_bad_debt_and_withholds_only_what_it_added(account):
    decision = compute(account.snapshot, POLICY, NOW)
    state = decision.state
    assert state.status == Status.PAST_DUE and not decision.bad_debt, state
    assert Level(state.level).rank <= POLICY.upgrade_max_level.rank, state
    assert not any(a.startswith("cancel:") for a in state.actions_requested), state
    products = state.entitlements["products"]
    upgrade = next(i for i in account.snapshot.invoices if i.id == "in_up")
    for product, allowed in products.items():
        if product not in upgrade.products or product in upgrade.credited_products:
            assert allowed == Access.FULL, (product, state)
    # exhausted (its dunning run out by the bad-debt rule's own conditions): reverted, never cancelled
    [assessed] = decision.assessments
    run_out = upgrade.status == "uncollectible" or (assessed.exhausted and (NOW - assessed.unpaid_since).days
                                                    >= BAD_DEBT_DAYS)
    assert ("revert:in_up" in state.actions_requested) == run_out, (assessed, state)


@SETTINGS
@given(account=accounts())
def test_products_whose_invoices_are_all_paid_keep_full_access(account):
    decision = compute(account.snapshot, POLICY, NOW)
    unpaid = unpaid_ids(decision)
    on_unpaid = products_of(account.snapshot, lambda i: i.id in unpaid)
    for product, allowed in decision.state.entitlements["products"].items():
        if product not in on_unpaid:
            assert allowed == Access.FULL, (product, decision.state)
    assert decision.state.entitlements["products"]["prod_annual"] == Access.FULL


@SETTINGS
@given(account=accounts())
def test_bad_debt_only_from_a_run_out_or_uncollectible_regular_invoice(account):
    decision = compute(account.snapshot, POLICY, NOW)
    if decision.state.status != Status.BAD_DEBT:
        assert not any(a.startswith("cancel:") for a in decision.state.actions_requested)
        return
    assert decision.bad_debt
    causes = [a for a in decision.assessments if not a.invoice.is_upgrade and (
        a.invoice.status == "uncollectible" or (a.exhausted and (NOW - a.unpaid_since).days >= BAD_DEBT_DAYS))]
    assert causes, decision.assessments
    assert set(decision.bad_debt_products) <= products_of(account.snapshot, lambda i: i in [c.invoice for c in causes])
    # what is cancelled is the subscription of a cause
    assert {f"cancel:{c.invoice.subscription_id}" for c in causes if c.level == Level.SUSPENDED} == {
        a for a in decision.state.actions_requested if a.startswith("cancel:")}


@SETTINGS
@given(account=accounts())
def test_retries_left_on_the_schedule_keep_an_invoice_out_of_bad_debt(account):
    """Age alone never makes bad debt: a transient decline whose schedule still has retries ahead
    (however old the invoice) keeps its invoice below suspended unless it was marked uncollectible."""
    decision = compute(account.snapshot, POLICY, NOW)
    if any(x.invoice_id is None for x in account.snapshot.attempts):
        # which invoice an unlinked attempt paid is a guess (twins of one age and amount can swap)
        return
    for a in decision.assessments:
        used = sum(1 for r in account.snapshot.retries if r.invoice_id == a.invoice.id)
        if (a.failure_class == FailureClass.TRANSIENT and used < len(POLICY.transient_schedule_days)
                and a.invoice.status != "uncollectible"):
            assert a.level != Level.SUSPENDED, a


@SETTINGS
@given(account=accounts(upgrade=False))
def test_small_balances_cap_at_notice(account):
    snap = account.snapshot
    decision = compute(snap, POLICY, NOW)
    # the account's balance in every currency it is billed in under the threshold
    if all(b < POLICY.small_balance_threshold_in(c) for c, b in balances(decision).items()):
        assert Level(decision.state.level).rank <= Level.NOTICE.rank, decision.state
        assert decision.state.status != Status.BAD_DEBT
        assert all(v == Access.FULL for v in decision.state.entitlements["products"].values())


@SETTINGS
@given(account=accounts())
def test_each_invoice_gets_the_first_matching_rule_from_the_most_severe_down(account):
    decision = compute(account.snapshot, POLICY, NOW)
    balance = balances(decision)
    for a in decision.assessments:
        age = (NOW - a.unpaid_since).days
        uncollectible = a.invoice.status == "uncollectible"
        if uncollectible or (a.exhausted and age >= BAD_DEBT_DAYS):
            expected = Level.SUSPENDED
        elif age >= 14:
            expected = Level.LIMITED
        elif age >= 7 or (age >= 3 and a.failure_class in (FailureClass.PERMANENT, FailureClass.ACTION_REQUIRED)):
            expected = Level.RESTRICT_PREMIUM
        else:
            expected = Level.NOTICE
        if a.invoice.is_upgrade:
            expected = min(expected, POLICY.upgrade_max_level, key=lambda lv: lv.rank)
        elif balance[a.invoice.currency] < POLICY.small_balance_threshold_in(a.invoice.currency):  # its own currency
            expected = min(expected, Level.NOTICE, key=lambda lv: lv.rank)
        assert a.level == expected, (a, expected)
        rule_reasons = [r for r in a.reasons if r.rule.startswith("level.")]
        assert rule_reasons and rule_reasons[-1].facts["invoice"] == a.invoice.id
    levels = [a.level for a in decision.assessments]
    assert decision.state.level == max(levels, key=lambda lv: lv.rank, default=Level.NONE)


@SETTINGS
@given(account=accounts(), later=st.floats(0.01, 40))
def test_time_alone_never_eases_the_decision(account, later):
    now2 = NOW + timedelta(days=later)
    before = compute(account.snapshot, POLICY, NOW).state
    after = compute(account.snapshot, POLICY, now2).state
    assert Level(after.level).rank >= Level(before.level).rank, (before, after)
    assert STATUS_RANK[Status(after.status)] >= STATUS_RANK[Status(before.status)], (before, after)
    severity = [Access.FULL, Access.PREMIUM_OFF, Access.READ_ONLY, Access.WITHHELD, Access.REVOKED]
    for product, allowed in before.entitlements["products"].items():
        assert severity.index(Access(after.entitlements["products"][product])) >= severity.index(Access(allowed)), (
            product, before, after)


@SETTINGS
@given(account=accounts(), seed=st.integers(0, 2**32 - 1))
def test_the_decision_does_not_depend_on_the_order_of_the_snapshot(account, seed):
    rng = random.Random(seed)

    def shuffled(items: tuple) -> tuple:
        as_list = list(items)
        rng.shuffle(as_list)
        return tuple(as_list)

    snap = account.snapshot
    other = replace(snap, invoices=shuffled(snap.invoices), attempts=shuffled(snap.attempts),
                    retries=shuffled(snap.retries), subscriptions=shuffled(snap.subscriptions))
    a, b = compute(snap, POLICY, NOW), compute(other, POLICY, NOW)
    assert a.state == b.state and a.state.reasons == b.state.reasons
    assert (a.bad_debt, a.bad_debt_products, a.bad_debt_reason) == (b.bad_debt, b.bad_debt_products, b.bad_debt_reason)


@SETTINGS
@given(account=accounts())
def test_the_decision_is_deterministic_and_says_its_rule(account):
    a, b = compute(account.snapshot, POLICY, NOW), compute(account.snapshot, POLICY, NOW)
    assert a.state == b.state and a.state.reasons == b.state.reasons
    rules = {r.rule for r in a.reasons}
    if a.state.status != Status.CURRENT:
        # the rule that matched, or the cap that brought the invoice down to the account's level
        assert rules & {f"level.{a.state.level}", "upgrade.capped", "balance.small"}, a.reasons
        assert all(any(r.rule.startswith("level.") for r in x.reasons) for x in a.assessments)
    if a.state.status == Status.BAD_DEBT:
        assert "level.suspended" in rules
    for action in a.state.actions_requested:
        assert ("upgrade.revert" if action.startswith("revert:") else "level.suspended") in rules


@SETTINGS
@given(account=accounts(), later=st.floats(0.01, 40))
def test_time_alone_never_eases_the_decision_stored_between(account, later):
    """As the fleet runs it: the first decision stored (and its bad-debt episode opened) before the
    beat's recompute at a later moment."""
    first = compute(account.snapshot, POLICY, NOW)
    stored = replace(account.snapshot, stored=first.state, stored_bad_debt_flag=first.bad_debt,
                     open_episode_entered_at=NOW if first.bad_debt else None)
    after = compute(stored, POLICY, NOW + timedelta(days=later)).state
    before = first.state
    assert Level(after.level).rank >= Level(before.level).rank, (before, after)
    assert STATUS_RANK[Status(after.status)] >= STATUS_RANK[Status(before.status)], (before, after)


# --- a simulated dunning run of several invoices at once -----------------------------------------

T0 = NOW - timedelta(days=80)
RUN_DECLINES = st.sampled_from(["insufficient_funds", "insufficient_funds", "do_not_honor", "expired_card",
                                "authentication_required", "a_code_stripe_adds_next_year"])


class MultiRun:
    """An account whose renewal, upgrade and next renewal fail at their own moments, each on its own
    payment intent (every retry charges it again), driven as the fleet drives it: beat dispatches the
    retry each decision plans when it is due, and each decision is stored before the next one."""

    def __init__(self) -> None:
        self.now = T0
        self.invoices: dict[str, Invoice] = {}
        self.attempts: dict[str, Attempt] = {}
        self.retries: list[Retry] = []
        self.methods = [PaymentMethod("pm_1", "card", True, T0 - timedelta(days=300))]
        self.default, self.default_at = "pm_1", T0 - timedelta(days=300)
        self.subs = {"sub_core": Subscription("sub_core", "active", ("prod_core",)),
                     "sub_annual": Subscription("sub_annual", "active", ("prod_annual",))}
        self.annual = settled_invoice("in_annual", "sub_annual", "prod_annual", "paid", 100)
        self.stored: DunningState | None = None
        self.bad_debt = False
        self.episode: datetime | None = None
        self.customer_acted = False
        self.history: list[tuple] = []

    def fail(self, inv_id: str, sub: str, lines: tuple[InvoiceLine, ...], reason: str, decline: str) -> None:
        amount = sum(ln.amount for ln in lines)
        self.invoices[inv_id] = Invoice(
            id=inv_id, status="open", billing_reason=reason, subscription_id=sub, amount_due=amount, amount_paid=0,
            amount_remaining=amount, created=self.now - timedelta(hours=1), lines=lines, attempt_count=1,
            first_failed_at=self.now, last_failed_at=self.now)
        self.attempts[inv_id] = Attempt(f"pi_{inv_id}", inv_id, self.default, "failed", self.now, amount=amount,
                                        decline_code=decline, charges=(Charge(f"ch_{inv_id}_0", self.default,
                                                                              self.now),))

    def charge(self, inv_id: str, method_id: str, decline: str) -> None:
        a = self.attempts[inv_id]
        charges = (*a.charges, Charge(f"ch_{inv_id}_{len(a.charges)}", method_id, self.now))
        self.attempts[inv_id] = replace(a, payment_method_id=method_id, attempted_at=self.now, decline_code=decline,
                                        charges=charges)
        self.invoices[inv_id] = replace(self.invoices[inv_id], last_failed_at=self.now)

    def snapshot(self) -> Snapshot:
        return Snapshot(account_id="acct_1", stored=self.stored, stored_bad_debt_flag=self.bad_debt,
                        invoices=(self.annual, *self.invoices.values()), attempts=tuple(self.attempts.values()),
                        payment_methods=tuple(self.methods), default_payment_method_id=self.default,
                        default_payment_method_changed_at=self.default_at, subscriptions=tuple(self.subs.values()),
                        retries=tuple(self.retries), open_episode_entered_at=self.episode)

    def recompute(self):
        decision = compute(self.snapshot(), POLICY, self.now)
        state = decision.state
        self.history.append((self.now - T0, state.status, state.level, state.retry_invoice_id, state.next_retry_at,
                             state.actions_requested))
        assert state.entitlements["products"]["prod_annual"] == Access.FULL, self.history
        regular = [a for a in decision.assessments if not a.invoice.is_upgrade]
        if decision.bad_debt:
            assert any(a.invoice.status == "uncollectible" or (a.exhausted and (self.now - a.unpaid_since).days
                                                               >= BAD_DEBT_DAYS) for a in regular), self.history
        else:
            assert not any(x.startswith("cancel:") for x in state.actions_requested), self.history
        for a in decision.assessments:
            if a.invoice.is_upgrade:
                assert a.level.rank <= POLICY.upgrade_max_level.rank, self.history
        if self.stored is not None:
            # no money arrives in this run: bad debt stays, and time alone never eases anything
            assert not (self.stored.status == Status.BAD_DEBT and state.status != Status.BAD_DEBT), self.history
            assert self.customer_acted or Level(state.level).rank >= Level(self.stored.level).rank, self.history
        if decision.bad_debt and self.episode is None:
            self.episode = self.now
        self.stored, self.bad_debt = state, decision.bad_debt
        return decision

    def dispatch(self, decision, decline: str) -> None:
        state = decision.state
        inv_id = state.retry_invoice_id
        method_id = state.retry_payment_method_id or self.default
        assert inv_id in self.invoices, self.history
        a = self.attempts[inv_id]
        assert len(a.charges) < POLICY.attempts_per_invoice, self.history
        window = [c for x in self.attempts.values() for c in x.charges
                  if c.payment_method_id == method_id and self.now - c.charged_at < timedelta(days=30)]
        assert len(window) < POLICY.attempts_per_method_30d, self.history  # the card network's cap
        self.retries.append(Retry(inv_id, method_id, len([r for r in self.retries if r.invoice_id == inv_id]) + 1,
                                  state.retry_free, "failed", state.next_retry_at, self.now))
        self.charge(inv_id, method_id, decline)


@settings(max_examples=int(os.environ.get("PROP_N_RUN", "40")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_simulated_dunning_run_of_several_invoices_keeps_the_rules(data):
    run = MultiRun()
    upgrade_day = data.draw(st.integers(0, 25))
    renewal2_day = data.draw(st.sampled_from([30, 31, 60, 1000]))
    kind = data.draw(st.sampled_from(["core_swap", "addon"]))
    renewal_day = data.draw(st.sampled_from([0, 0, 10, 1000]))
    pending = {upgrade_day: "upgrade", renewal_day + 0.5: "renewal", renewal_day + renewal2_day: "renewal2"}
    decision = run.recompute()
    for _ in range(data.draw(st.integers(1, 40))):
        until = run.now + timedelta(minutes=data.draw(st.integers(1, 6 * 24 * 60)))
        decision = beat_until(run, decision, until, lambda: data.draw(RUN_DECLINES))
        for day, what in sorted(pending.items()):
            if run.now - T0 >= timedelta(days=day):
                del pending[day]
                if what == "upgrade" and kind == "core_swap":
                    run.subs["sub_core"] = Subscription("sub_core", "active", ("prod_premium",))
                    run.fail("in_up", "sub_core", (InvoiceLine("prod_core", -2000, "si_core"),
                                                   InvoiceLine("prod_premium", 6000, "si_core")),
                             "subscription_update", data.draw(RUN_DECLINES))
                elif what == "upgrade":
                    run.subs["sub_up"] = Subscription("sub_up", "active", ("prod_addon",))
                    run.fail("in_up", "sub_up", (InvoiceLine("prod_addon", 3000, "si_addon"),),
                             "subscription_update", data.draw(RUN_DECLINES))
                elif what == "renewal":
                    run.fail("in_cycle", "sub_core", (InvoiceLine("prod_core", 5000),), "subscription_cycle",
                             data.draw(RUN_DECLINES))
                else:
                    run.fail("in_cycle2", "sub_core", (InvoiceLine("prod_core", 5000),), "subscription_cycle",
                             data.draw(RUN_DECLINES))
        action = data.draw(st.sampled_from(["wait"] * 5 + ["new_card", "hosted_page"]))
        if action == "new_card":
            run.methods.append(PaymentMethod(f"pm_{len(run.methods) + 1}", "card", True, run.now))
            run.default, run.default_at = run.methods[-1].id, run.now
        elif action == "hosted_page" and run.invoices:
            # the customer tries one invoice on the hosted invoice page with the default card: declined
            run.charge(data.draw(st.sampled_from(sorted(run.invoices))), run.default, data.draw(RUN_DECLINES))
        run.customer_acted = run.customer_acted or action != "wait"
        decision = run.recompute()
        if run.now - T0 > timedelta(days=75):
            break


# --- an unpaid swap gives back none of the access the unpaid plan it replaced lost ----------------


def _renewal_then_unpaid_swap(renewal_days_ago: float, decline: str = "insufficient_funds") -> Snapshot:
    """sub_core's renewal for prod_core unpaid ``renewal_days_ago`` (its retries used), then an unpaid
    upgrade swapping prod_core for prod_premium on the same subscription item, failed 8 days ago."""
    renewal = Unpaid(renewal_days_ago, decline, 6, 5000, False)
    swap = Unpaid(8, "insufficient_funds", 0, 4000, False)
    a = build_invoice("in_cycle", "sub_core", (InvoiceLine("prod_core", 5000),), renewal, "subscription_cycle")
    b = build_invoice("in_up", "sub_core", (InvoiceLine("prod_core", -2000, "si_core"),
                                            InvoiceLine("prod_premium", 6000, "si_core")), swap, "subscription_update")
    return Snapshot(account_id="acct_1", stored=None, invoices=(a[0], b[0]), attempts=(a[1], b[1]),
                    payment_methods=(PaymentMethod("pm_1", "card", True, days(400)),),
                    default_payment_method_id="pm_1", default_payment_method_changed_at=days(400),
                    subscriptions=(Subscription("sub_core", "active", ("prod_premium",)),), retries=(*a[2], *b[2]))


def test_an_unpaid_swap_keeps_core_only_as_far_as_the_unpaid_core_plan_keeps_it():
    """DESIGN 4: limited is "core read-only", suspended revokes. A swap (core -> premium) that is
    itself unpaid is ``premium_off``, "core kept", because the customer held core before it: but
    what they held is the plan on the renewal still unpaid, read-only at 15 days and revoked in bad
    debt. Upgrading must not give back the core access the unpaid renewal took (nor keep core on
    the subscription being cancelled for bad debt)."""
    limited = compute(_renewal_then_unpaid_swap(15), POLICY, NOW).state
    assert limited.level == Level.LIMITED and limited.entitlements["products"] == {
        "prod_core": "read_only", "prod_premium": "read_only"}, limited.entitlements
    bad_debt = compute(_renewal_then_unpaid_swap(25), POLICY, NOW)
    assert bad_debt.bad_debt and "cancel:sub_core" in bad_debt.state.actions_requested
    assert bad_debt.state.entitlements["products"] == {"prod_core": "revoked", "prod_premium": "revoked"}
    # a renewal still at notice takes nothing: the swap's own premium_off stays
    notice = compute(_renewal_then_unpaid_swap(1), POLICY, NOW).state
    assert notice.entitlements["products"] == {"prod_core": "full", "prod_premium": "premium_off"}


@SETTINGS
@given(account=accounts(renewal=True, upgrade=True))
def test_a_swapped_in_product_is_never_more_accessible_than_the_product_it_replaced(account):
    decision = compute(account.snapshot, POLICY, NOW)
    products = decision.state.entitlements["products"]
    severity = [Access.FULL, Access.PREMIUM_OFF, Access.READ_ONLY, Access.WITHHELD, Access.REVOKED]
    if account.upgrade == "core_swap" and "in_up" in unpaid_ids(decision) and "in_cycle" in unpaid_ids(decision):
        assert severity.index(Access(products["prod_premium"])) >= severity.index(Access(products["prod_core"])), (
            products)
