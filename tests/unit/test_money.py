"""app/money.py: Stripe's integer minor units shown in the currency's major units, for people."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.money import THREE_DECIMAL, TWO_DECIMAL, ZERO_DECIMAL, exponent, facts_shown, money, owed

# Stripe's lists (https://docs.stripe.com/currencies), as the product's contract with support names them.
STRIPE_ZERO_DECIMAL = ["bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
                       "xaf", "xof", "xpf"]
STRIPE_THREE_DECIMAL = ["bhd", "jod", "kwd", "omr", "tnd"]


@pytest.mark.parametrize(("amount", "currency", "shown"), [
    (5000, "usd", "50.00 USD"),
    (5000, "eur", "50.00 EUR"),
    (1, "usd", "0.01 USD"),
    (0, "usd", "0.00 USD"),
    (123456789, "gbp", "1234567.89 GBP"),
    (-1250, "usd", "-12.50 USD"),
    (-5, "eur", "-0.05 EUR"),
    (5000, "jpy", "5000 JPY"),
    (5000, "krw", "5000 KRW"),
    (-300, "jpy", "-300 JPY"),
    (1500, "kwd", "1.500 KWD"),
    (5, "bhd", "0.005 BHD"),
    (-1005, "tnd", "-1.005 TND"),
    (5000, "USD", "50.00 USD"),   # case is not meaning
    (5000, " usd ", "50.00 USD"),
    (500, "isk", "5.00 ISK"),     # two-decimal in Stripe's API, whatever ISO says
    (500, "huf", "5.00 HUF"),
])
def test_amounts_are_shown_in_major_units_with_the_currencys_own_exponent(amount, currency, shown):
    assert money(amount, currency) == shown


@pytest.mark.parametrize(("amount", "currency", "shown"), [
    (5000, "xyz", "5000 XYZ (minor units)"),
    (-5000, "abc", "-5000 ABC (minor units)"),
    (5000, "", "5000 (no currency) (minor units)"),
    (5000, None, "5000 (no currency) (minor units)"),
    (5000, "u$d", "5000 'u$d' (minor units)"),
    (5000, "usd\n", "50.00 USD"),
    (5000, "<b>", "5000 '<b>' (minor units)"),
])
def test_an_unknown_currency_shows_the_minor_units_and_its_code_never_a_guessed_exponent(amount, currency, shown):
    assert money(amount, currency) == shown


@pytest.mark.parametrize("amount", [None, "5000", 50.0, Decimal("5000"), True])
def test_an_amount_that_is_no_integer_is_shown_as_it_is_never_raising(amount):
    shown = money(amount, "usd")
    assert shown == f"{amount} USD (minor units)"


def test_an_amount_holding_control_characters_is_quoted_never_passed_on():
    # Alerts store the text and the CLI prints it: an escape sequence must not reach a terminal as one.
    shown = money("50\x1b[31m\n", "usd")
    assert "\x1b" not in shown and "\n" not in shown
    assert shown == "'50\\x1b[31m\\n' USD (minor units)"


def test_stripes_special_currencies_have_their_exponents():
    assert [exponent(c) for c in STRIPE_ZERO_DECIMAL] == [0] * len(STRIPE_ZERO_DECIMAL)
    assert [exponent(c) for c in STRIPE_THREE_DECIMAL] == [3] * len(STRIPE_THREE_DECIMAL)
    assert exponent("usd") == exponent("eur") == exponent("gbp") == 2
    assert exponent("xyz") is None and exponent(None) is None and exponent("") is None
    assert not (ZERO_DECIMAL & THREE_DECIMAL) and not (ZERO_DECIMAL & TWO_DECIMAL) and not (THREE_DECIMAL & TWO_DECIMAL)


def test_what_is_owed_lists_each_currency_never_a_sum():
    assert owed([{"currency": "eur", "amount": 1000}, {"currency": "usd", "amount": 1000}]) == "10.00 EUR, 10.00 USD"
    assert owed([{"currency": "jpy", "amount": 1000}]) == "1000 JPY"
    assert owed([]) == "nothing"
    assert owed(None) == "not known"


def test_a_reasons_amount_facts_are_shown_in_their_currency_and_the_rest_as_they_are():
    facts = {"invoice": "in_1", "balance": 450, "currency": "usd", "threshold": 500, "would_be": "limited",
             "retries_exhausted": False}
    assert facts_shown(facts) == {"invoice": "in_1", "balance": "4.50 USD", "currency": "usd",
                                  "threshold": "5.00 USD", "would_be": "limited", "retries_exhausted": False}
    assert facts["balance"] == 450  # the stored facts are not changed
    without_currency = {"invoice": "in_1", "balance": 450}
    assert facts_shown(without_currency) == without_currency


KNOWN = sorted(ZERO_DECIMAL | THREE_DECIMAL | TWO_DECIMAL)
SHOWN = re.compile(r"(-?)(\d+)(?:\.(\d+))? ([A-Z]{3})")


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.sampled_from(KNOWN))
def test_a_known_currencys_amount_reads_back_to_the_same_minor_units(amount, currency):
    shown = money(amount, currency)
    parsed = SHOWN.fullmatch(shown)
    assert parsed is not None, shown
    sign, major, minor, code = parsed.groups()
    digits = exponent(currency)
    assert code == currency.upper()
    assert len(minor or "") == digits  # always the currency's full exponent: 50.00, never 50 or 50.0
    assert (-1 if sign else 1) * (int(major) * 10 ** digits + int(minor or "0")) == amount
    assert (sign == "-") == (amount < 0)


@given(st.integers(), st.one_of(st.none(), st.text(max_size=12)))
def test_any_amount_in_any_currency_is_shown_without_raising_and_names_minor_units_when_unknown(amount, currency):
    shown = money(amount, currency)
    assert str(abs(amount) // 10 ** (exponent(currency) or 0)) in shown
    if exponent(currency) is None:
        assert shown.endswith("(minor units)") and shown.startswith(str(amount))
