"""The dunning policy: every number of the rules, validated, with hard caps no file can lift.

``parse_policy`` turns the decoded file (a dict) into a ``Policy`` or raises ``PolicyError`` naming
the key and the problem. Reading the file is the edge's job (app/policy_file.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.domain.state import FailureClass, Level

# Card network rules: whatever a policy says, never more than these.
HARD_CAP_ATTEMPTS_PER_METHOD_30D = 15
HARD_CAP_ATTEMPTS_PER_INVOICE = 8
MAX_RETRY_DAY = 365  # a retry a year after the failure is no dunning any more (and dates stay in range)
# Upper bounds of the other numbers: past them a value is a typo, and date arithmetic or SQL
# parameters built from it would overflow at run time (a 500, a failing task) instead of at start-up.
MAX_RULE_DAYS = 3650  # ten years unpaid
MAX_RULE_ATTEMPTS = 1000
MAX_AMOUNT = 10**12  # minor units: more than any single Stripe charge in any currency
MAX_GUARD_MINUTES = 7 * 24 * 60  # a week

RULE_CONDITIONS = {
    "min_days",
    "failure_classes",
    "retries_exhausted",
    "marked_uncollectible",
    "min_attempts",
    "min_balance",
}


class PolicyError(ValueError):
    """The policy file is invalid; ``key`` names where."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"policy key '{key}': {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class LevelRule:
    level: Level
    min_days: int | None = None
    failure_classes: frozenset[FailureClass] | None = None
    retries_exhausted: bool | None = None
    marked_uncollectible: bool | None = None
    min_attempts: int | None = None
    # Currency code -> minor units of that currency: one number of minor units is no amount in every
    # currency (500 is $5.00, but 5.00 rupiah or 500 yen). A currency it does not name does not meet
    # the condition: the rule does not match, and a rule below it (less severe) is tried.
    min_balance: Mapping[str, int] | None = field(default=None, hash=False)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in sorted(RULE_CONDITIONS):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                out[name] = dict(sorted(value.items()))
            elif value is not None:
                out[name] = sorted(value) if isinstance(value, frozenset) else value
        return out

    def balance_meets(self, balance: int, currency: str) -> bool:
        """Whether ``balance``, in ``currency``'s minor units, meets the rule's min_balance: always
        without one; never in a currency the rule names no amount for."""
        if self.min_balance is None:
            return True
        bound = self.min_balance.get(currency_code(currency))
        return bound is not None and balance >= bound


@dataclass(frozen=True)
class Policy:
    version: str
    transient_schedule_days: tuple[int, ...] = (1, 3, 5, 7, 10, 14)
    unknown_schedule_days: tuple[int, ...] = (2, 5, 9)
    max_attempts_per_invoice: int = HARD_CAP_ATTEMPTS_PER_INVOICE
    max_attempts_per_method_30d: int = HARD_CAP_ATTEMPTS_PER_METHOD_30D
    # Free immediate retry after the customer changes the payment method.
    immediate_retry_on_new_method: bool = True
    rules: tuple[LevelRule, ...] = ()
    # Minor units of the invoice's currency: the threshold of a currency not in
    # ``small_balance_thresholds`` (one number of minor units is no threshold in every currency).
    small_balance_threshold: int = 0
    small_balance_thresholds: Mapping[str, int] = field(default_factory=dict)  # currency code -> minor units
    upgrade_max_level: Level = Level.RESTRICT_PREMIUM
    products: Mapping[str, str] = field(default_factory=dict)  # product id -> "core" | "premium"
    default_product_tier: str = "core"
    guard_window_minutes: int = 30
    extra: Mapping[str, Any] = field(default_factory=dict)  # sections other parts own (rollout...)

    @property
    def attempts_per_invoice(self) -> int:
        return min(self.max_attempts_per_invoice, HARD_CAP_ATTEMPTS_PER_INVOICE)

    @property
    def attempts_per_method_30d(self) -> int:
        return min(self.max_attempts_per_method_30d, HARD_CAP_ATTEMPTS_PER_METHOD_30D)

    def tier(self, product: str) -> str:
        return self.products.get(product, self.default_product_tier)

    def small_balance_threshold_in(self, currency: str) -> int:
        """The small-balance threshold of ``currency``, in its minor units: its own, else the default.
        Stripe writes currency codes in lower case; any case is read as one."""
        return self.small_balance_thresholds.get(currency_code(currency), self.small_balance_threshold)


def currency_code(currency: str | None) -> str:
    """A currency as the policy's tables name it: Stripe writes codes in lower case; any case is one."""
    return str(currency or "").strip().lower()


def _expect(cond: bool, key: str, problem: str) -> None:
    if not cond:
        raise PolicyError(key, problem)


def _named(value: Any, names: set[str]) -> bool:
    """Whether ``value`` is one of ``names``. A TOML array or table is no name, and unhashable: a
    set lookup of it would raise TypeError, a traceback at start-up instead of the key's error."""
    return isinstance(value, str) and value in names


def _only(section: Mapping[str, Any], path: str, known: set[str]) -> None:
    """A key the policy does not know is a typo until proven otherwise: ignored, it would leave a
    default in force (a rule's ``wen`` for ``when`` matches every account)."""
    unknown = set(section) - known
    _expect(not unknown, path or "policy file", f"unknown key(s) {sorted(unknown)}; known: {sorted(known)}")


def _int(data: Mapping[str, Any], key: str, path: str, default: int, maximum: int, minimum: int = 0,
         why: str = "") -> int:
    value = data.get(key, default)
    _expect(isinstance(value, int) and not isinstance(value, bool), f"{path}.{key}", "must be a whole number")
    _expect(value >= minimum, f"{path}.{key}", f"must be at least {minimum}")
    _expect(value <= maximum, f"{path}.{key}", f"must be at most {maximum}{why}, got {value}")
    return int(value)


def _days(data: Mapping[str, Any], key: str, path: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = data.get(key, list(default))
    full = f"{path}.{key}"
    _expect(isinstance(value, list), full, "must be a list of days")
    _expect(all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_RETRY_DAY for v in value), full,
            f"every entry must be a whole number of days from 1 to {MAX_RETRY_DAY}")
    _expect(all(a < b for a, b in itertools.pairwise(value)), full, "days must be increasing")
    _expect(len(value) < HARD_CAP_ATTEMPTS_PER_INVOICE, full,
            f"at most {HARD_CAP_ATTEMPTS_PER_INVOICE - 1} retries fit the per-invoice cap")
    return tuple(value)


def _thresholds(data: Mapping[str, Any], key: str, path: str) -> dict[str, int]:
    """Per-currency amounts: a table of ISO currency code (any case) = whole number of minor units."""
    value = data.get(key, {})
    full = f"{path}.{key}"
    _expect(isinstance(value, Mapping), full, "must be a table of currency code = amount in minor units")
    out: dict[str, int] = {}
    for code in value:
        currency = str(code).strip().lower()
        _expect(len(currency) == 3 and currency.isascii() and currency.isalpha(), f"{full}.{code}",
                "must be a three-letter currency code (usd, jpy, ...)")
        _expect(currency not in out, f"{full}.{code}", f"names the currency {currency} twice")
        out[currency] = _int(value, code, full, 0, MAX_AMOUNT)
    return out


def _rule(raw: Any, index: int) -> LevelRule:
    path = f"consequences.rules[{index}]"
    _expect(isinstance(raw, Mapping), path, "must be a table")
    _only(raw, path, {"level", "when"})
    level_name = raw.get("level")
    _expect(_named(level_name, {lvl.value for lvl in Level}), f"{path}.level",
            f"must be one of {', '.join(lvl.value for lvl in Level)}")
    # DESIGN 4: none is "nothing unpaid". A rule at none left an account that owes at none: past due,
    # full access and nobody told (an invoice no rule matches is at notice: compute._match_level).
    _expect(level_name != Level.NONE.value, f"{path}.level",
            "must not be none: none is the level of nothing unpaid, a rule's level is notice or above")
    when = raw.get("when", {})
    _expect(isinstance(when, Mapping), f"{path}.when", "must be a table")
    unknown = set(when) - RULE_CONDITIONS
    _expect(not unknown, f"{path}.when", f"unknown condition(s) {sorted(unknown)}; known: {sorted(RULE_CONDITIONS)}")
    classes = when.get("failure_classes")
    if classes is not None:
        valid = {c.value for c in FailureClass}
        _expect(isinstance(classes, list) and all(_named(c, valid) for c in classes),
                f"{path}.when.failure_classes", f"must list classes among {sorted(valid)}")
        # An empty list matches no invoice at all: the rule would be there and never apply.
        _expect(bool(classes), f"{path}.when.failure_classes",
                f"must list at least one class among {sorted(valid)} (leave it out to match any)")
    for flag in ("retries_exhausted", "marked_uncollectible"):
        if flag in when:
            _expect(isinstance(when[flag], bool), f"{path}.when.{flag}", "must be true or false")
    for number, maximum in (("min_days", MAX_RULE_DAYS), ("min_attempts", MAX_RULE_ATTEMPTS)):
        if number in when:
            _int(when, number, f"{path}.when", 0, maximum)
    min_balance = _min_balance(when, f"{path}.when") if "min_balance" in when else None
    if level_name == Level.SUSPENDED.value:
        # Bad debt cancels the subscription: never for being unpaid alone, whatever the days (DESIGN 4).
        _expect(when.get("retries_exhausted") is True or when.get("marked_uncollectible") is True, f"{path}.when",
                "a suspended (bad debt) rule must require retries_exhausted = true or marked_uncollectible = true")
    return LevelRule(
        level=Level(level_name),
        min_days=when.get("min_days"),
        failure_classes=frozenset(FailureClass(c) for c in classes) if classes is not None else None,
        retries_exhausted=when.get("retries_exhausted"),
        marked_uncollectible=when.get("marked_uncollectible"),
        min_attempts=when.get("min_attempts"),
        min_balance=min_balance,
    )


def _min_balance(when: Mapping[str, Any], path: str) -> dict[str, int]:
    """A rule's min_balance: per currency, as the small-balance thresholds. One number was the same
    count of minor units in every currency: "at least $50" (5000) was 50 rupiah, or 5000 yen ($33)."""
    value = when["min_balance"]
    _expect(isinstance(value, Mapping), f"{path}.min_balance",
            "must be a table of currency code = amount in that currency's minor units, e.g. "
            "{ usd = 5000, eur = 5000, jpy = 7500 }: one number of minor units is no amount in every currency "
            "(500 is $5.00, but 5.00 rupiah or 500 yen); a currency the table does not name does not meet "
            "the condition")
    _expect(bool(value), f"{path}.min_balance",
            "must name at least one currency (leave min_balance out to match any balance)")
    return _thresholds(when, "min_balance", path)


def _always_first(earlier: LevelRule, later: LevelRule) -> bool:
    """Whether every invoice ``later`` matches is matched by ``earlier`` too (so, tried first, it wins).
    Conservative: a condition of ``earlier`` that ``later`` does not imply (or leaves out) says no. A
    number of 0 always holds (days and attempts are never negative): no condition. A min_balance
    table holds in the currencies it names only: ``later``'s must name no other, each with as much."""
    for name in ("min_days", "min_attempts"):
        bound, theirs = getattr(earlier, name), getattr(later, name)
        if bound and (theirs is None or theirs < bound):
            return False
    if earlier.min_balance is not None and (
            later.min_balance is None
            or not all(c in earlier.min_balance and amount >= earlier.min_balance[c]
                       for c, amount in later.min_balance.items())):
        return False
    if earlier.failure_classes is not None and (later.failure_classes is None
                                                or not later.failure_classes <= earlier.failure_classes):
        return False
    for flag in ("retries_exhausted", "marked_uncollectible"):
        if getattr(earlier, flag) is not None and getattr(earlier, flag) != getattr(later, flag):
            return False
    return True


def _check_reachable(rules: tuple[LevelRule, ...]) -> None:
    """DESIGN 4's levels are graduated: a less severe rule that a more severe one always matches
    before it never applies (restrict_premium from day 20 under limited from day 14: every customer
    goes from notice straight to limited). Suspended rules are left out as the earlier one: the
    payment-flow guard holds a suspended invoice at its first matching rule below suspended
    (compute._held_level), where a later rule is still used."""
    for i, later in enumerate(rules):
        for j, earlier in enumerate(rules[:i]):
            if earlier.level == Level.SUSPENDED or earlier.level.rank <= later.level.rank:
                continue
            _expect(not _always_first(earlier, later), f"consequences.rules[{i}]",
                    f"can never match: consequences.rules[{j}] ({earlier.level.value}, {earlier.describe()}) "
                    f"matches every invoice this {later.level.value} rule ({later.describe()}) does, and is tried "
                    "first; a less severe level needs a lower threshold (or a condition the more severe one "
                    "lacks)")


def parse_policy(data: Mapping[str, Any]) -> Policy:
    version = data.get("version")
    _expect(isinstance(version, str) and bool(version.strip()), "version", "must be a non-empty string")
    # Stored with every decision: PostgreSQL text holds no NUL (TOML's "\u0000"), and every recompute failed.
    _expect("\x00" not in str(version), "version", "must not contain a NUL character")
    retry = data.get("retry", {})
    _expect(isinstance(retry, Mapping), "retry", "must be a table")
    consequences = data.get("consequences", {})
    _expect(isinstance(consequences, Mapping), "consequences", "must be a table")
    raw_rules = consequences.get("rules", [])
    _expect(isinstance(raw_rules, list) and bool(raw_rules), "consequences.rules", "must be a non-empty list of rules")
    rules = tuple(_rule(r, i) for i, r in enumerate(raw_rules))
    ranks = [r.level.rank for r in rules]
    _expect(ranks == sorted(ranks, reverse=True), "consequences.rules",
            "must be ordered from the most severe level down (first match wins)")
    _check_reachable(rules)
    upgrade_max = consequences.get("upgrade_max_level", Level.RESTRICT_PREMIUM.value)
    # Below suspended: an upgrade never makes bad debt. Above none, as a rule's level: an unpaid upgrade
    # at none would be past due with full access and nobody told.
    _expect(_named(upgrade_max, {lvl.value for lvl in Level})
            and upgrade_max not in (Level.SUSPENDED.value, Level.NONE.value),
            "consequences.upgrade_max_level", "must be a level from notice to limited, below suspended (an upgrade "
            "never makes bad debt) and not none (the level of nothing unpaid: an unpaid upgrade is at least at notice)")

    products_section = data.get("products", {})
    _expect(isinstance(products_section, Mapping), "products", "must be a table")
    default_tier = products_section.get("default_tier", "core")
    _expect(default_tier in ("core", "premium"), "products.default_tier", "must be 'core' or 'premium'")
    catalog = products_section.get("catalog", {})
    _expect(isinstance(catalog, Mapping), "products.catalog", "must be a table of product id = tier")
    for product, tier in catalog.items():
        _expect(tier in ("core", "premium"), f"products.catalog.{product}", "must be 'core' or 'premium'")

    guard = data.get("guard", {})
    _expect(isinstance(guard, Mapping), "guard", "must be a table")
    immediate = retry.get("immediate_retry_on_new_method", True)
    _expect(isinstance(immediate, bool), "retry.immediate_retry_on_new_method", "must be true or false")

    transient_days = _days(retry, "transient_schedule_days", "retry", Policy.transient_schedule_days)
    unknown_days = _days(retry, "unknown_schedule_days", "retry", Policy.unknown_schedule_days)
    # DESIGN 4: unknown is "treated as transient with a smaller budget" (none at all is smaller too).
    _expect(not unknown_days or len(unknown_days) < len(transient_days), "retry.unknown_schedule_days",
            f"must have fewer retries than retry.transient_schedule_days ({len(transient_days)}): an unknown "
            "decline is retried like a transient one with a smaller budget")

    _only(data, "", {"version", "retry", "consequences", "products", "guard", "rollout"})
    _only(retry, "retry", {"transient_schedule_days", "unknown_schedule_days", "max_attempts_per_invoice",
                           "max_attempts_per_method_30d", "immediate_retry_on_new_method"})
    _only(consequences, "consequences", {"small_balance_threshold", "small_balance_thresholds", "upgrade_max_level",
                                         "rules"})
    _only(products_section, "products", {"default_tier", "catalog"})
    _only(guard, "guard", {"window_minutes"})
    known = {"version", "retry", "consequences", "products", "guard"}
    return Policy(
        version=str(version).strip(),
        transient_schedule_days=transient_days,
        unknown_schedule_days=unknown_days,
        max_attempts_per_invoice=_int(retry, "max_attempts_per_invoice", "retry", HARD_CAP_ATTEMPTS_PER_INVOICE,
                                      HARD_CAP_ATTEMPTS_PER_INVOICE, 1, " (the card networks' cap)"),
        max_attempts_per_method_30d=_int(retry, "max_attempts_per_method_30d", "retry",
                                         HARD_CAP_ATTEMPTS_PER_METHOD_30D, HARD_CAP_ATTEMPTS_PER_METHOD_30D, 1,
                                         " (the card networks' cap)"),
        immediate_retry_on_new_method=immediate,
        rules=rules,
        small_balance_threshold=_int(consequences, "small_balance_threshold", "consequences", 0, MAX_AMOUNT),
        small_balance_thresholds=_thresholds(consequences, "small_balance_thresholds", "consequences"),
        upgrade_max_level=Level(upgrade_max),
        products=dict(catalog),
        default_product_tier=default_tier,
        guard_window_minutes=_int(guard, "window_minutes", "guard", 30, MAX_GUARD_MINUTES, 1),
        extra={k: v for k, v in data.items() if k not in known},
    )
