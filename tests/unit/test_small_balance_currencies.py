"""The small-balance cap in each currency's own terms (DESIGN 4: "Small balances under a policy
threshold cap at notice").

Amounts are in the currency's minor unit, and one number of minor units is no threshold in every
currency: 500 is $5.00, but 5.00 Indonesian rupiah (a fraction of a cent) or 500 Korean won (about
$0.35). With one threshold for all, a debt of a few cents in those currencies was bad debt and its
subscription cancelled. The policy names a threshold per currency; the others keep the default.
"""

from __future__ import annotations

import tomllib

import pytest

from app.domain.compute import compute
from app.domain.policy import PolicyError, parse_policy
from app.domain.state import Level, Status
from app.policy_file import DEFAULT_POLICY, load_policy
from tests.unit.builders import NOW, TWO_SUBSCRIPTIONS, invoice, snapshot

POLICY = load_policy()


def default_data() -> dict:
    return tomllib.loads(DEFAULT_POLICY.read_text())


def written_off(currency: str, amount: int, inv_id: str = "in_1", sub: str = "sub_1"):
    """An invoice marked uncollectible 40 days after it failed: bad debt unless its balance is small."""
    return invoice(inv_id, status="uncollectible", failed_days_ago=40, amount=amount, currency=currency, sub=sub)


@pytest.mark.parametrize(("currency", "amount"), [
    ("idr", 600),  # 6 rupiah
    ("krw", 300),  # 300 won, zero-decimal
    ("huf", 40_000),  # 400 forint, about $1
    ("cop", 400_000),  # 4,000 pesos, about $1
    ("ars", 100_000),  # 1,000 pesos, about $1
    ("kzt", 50_000),  # 500 tenge, about $1
    ("uzs", 1_300_000),  # 13,000 som, about $1
    ("gnf", 8_600),  # 8,600 francs, zero-decimal, about $1
    ("jpy", 600),  # 600 yen, zero-decimal, about $4
    ("tzs", 270_000),  # 2,700 shillings, about $1
    ("lbp", 9_000_000),  # 90,000 pounds, about $1
])
def test_a_balance_of_cents_in_a_currency_of_small_units_is_a_small_balance(currency, amount):
    decision = compute(snapshot(written_off(currency, amount)), POLICY, NOW)
    assert decision.state.level == Level.NOTICE and decision.state.status == Status.PAST_DUE
    [small] = [r for r in decision.reasons if r.rule == "balance.small"]
    assert small.facts["currency"] == currency and small.facts["balance"] == amount
    assert small.facts["threshold"] == POLICY.small_balance_threshold_in(currency) > POLICY.small_balance_threshold


# Each a balance of about $1 (rough rates of late 2026), 5 to 180 times the default's 500 minor units:
# with the default as their threshold, such a balance went to bad debt and its subscription was
# cancelled where $1 owed in USD stays at notice.
@pytest.mark.parametrize(("currency", "amount"), [
    ("dop", 6_300),  # 63 Dominican pesos
    ("uyu", 4_000),  # 40 Uruguayan pesos
    ("mur", 4_600),  # 46 Mauritian rupees
    ("cve", 9_500),  # 95 Cape Verdean escudos
    ("gmd", 7_200),  # 72 dalasi
    ("mkd", 5_300),  # 53 denars
    ("nio", 3_700),  # 37 cordobas
    ("hnl", 2_600),  # 26 lempiras
    ("srd", 3_700),  # 37 Surinamese dollars
    ("lrd", 18_000),  # 180 Liberian dollars
    ("mdl", 1_700),  # 17 lei
    ("tjs", 950),  # 9.50 somoni
    ("nad", 1_800),  # 18 Namibian dollars
    ("lsl", 1_800),  # 18 loti
    ("szl", 1_800),  # 18 emalangeni
    ("bwp", 1_350),  # 13.50 pula
    ("scr", 1_450),  # 14.50 Seychellois rupees
    ("mvr", 1_540),  # 15.40 rufiyaa
    ("mad", 920),  # 9.20 dirhams
    ("sbd", 830),  # 8.30 Solomon Islands dollars
    ("mop", 800),  # 8 patacas
    ("gtq", 770),  # 7.70 quetzales
    ("bob", 690),  # 6.90 bolivianos
    ("ttd", 680),  # 6.80 Trinidad and Tobago dollars
    ("rub", 8_000),  # 80 roubles
    ("brl", 540),  # 5.40 reais
    ("sll", 2_300_000),  # 23,000 old leones (as sle's 23)
])
def test_a_balance_of_about_a_dollar_in_the_other_currencies_of_small_units_is_a_small_balance(currency, amount):
    decision = compute(snapshot(written_off(currency, amount)), POLICY, NOW)
    assert decision.state.level == Level.NOTICE and decision.state.status == Status.PAST_DUE
    # and about $30 is a real debt there too
    assert compute(snapshot(written_off(currency, amount * 30)), POLICY, NOW).state.status == Status.BAD_DEBT


def test_a_real_debt_in_such_a_currency_still_goes_to_bad_debt():
    decision = compute(snapshot(written_off("idr", 50_000_000)), POLICY, NOW)  # 500,000 rupiah, about $30
    assert decision.state.status == Status.BAD_DEBT and decision.state.level == Level.SUSPENDED


def test_each_currency_is_compared_with_its_own_threshold():
    """An account billed in two currencies: 400 cents is small, 400 won is small too, each in its own
    terms; 600 cents is not, whatever the won's threshold is."""
    usd, krw = written_off("usd", 400), written_off("krw", 400, "in_krw", "sub_2")
    both = compute(snapshot(usd, krw, subscriptions=TWO_SUBSCRIPTIONS), POLICY, NOW)
    assert both.state.status == Status.PAST_DUE and both.state.level == Level.NOTICE
    usd_real = compute(snapshot(written_off("usd", 600), krw, subscriptions=TWO_SUBSCRIPTIONS), POLICY, NOW)
    assert usd_real.state.status == Status.BAD_DEBT
    assert [a.invoice.id for a in usd_real.assessments if a.level == Level.SUSPENDED] == ["in_1"]


def test_a_currency_not_listed_keeps_the_default_threshold_and_case_does_not_matter():
    data = default_data()
    data["consequences"]["small_balance_threshold"] = 700
    data["consequences"]["small_balance_thresholds"] = {"JPY": 90}
    pol = parse_policy(data)
    assert pol.small_balance_threshold_in("jpy") == pol.small_balance_threshold_in(" JPY ") == 90
    assert pol.small_balance_threshold_in("usd") == pol.small_balance_threshold_in("xyz") == 700


@pytest.mark.parametrize(("thresholds", "key", "problem"), [
    ({"dollars": 500}, "consequences.small_balance_thresholds.dollars", "currency code"),
    ({"jpy": -1}, "consequences.small_balance_thresholds.jpy", "at least 0"),
    ({"jpy": "500"}, "consequences.small_balance_thresholds.jpy", "whole number"),
    ({"jpy": 10**13}, "consequences.small_balance_thresholds.jpy", "at most"),
    ({"jpy": 500, "JPY": 600}, "consequences.small_balance_thresholds.JPY", "twice"),
    ([500], "consequences.small_balance_thresholds", "table"),
])
def test_a_wrong_per_currency_threshold_stops_start_up_naming_its_key(thresholds, key, problem):
    data = default_data()
    data["consequences"]["small_balance_thresholds"] = thresholds
    with pytest.raises(PolicyError) as err:
        parse_policy(data)
    assert err.value.key == key and problem in err.value.problem

