"""Amounts as a person reads them: Stripe's integer minor units in the currency's major units.

Stripe (and every store and JSON API of this product) keeps an amount as an integer of the
currency's smallest unit: ``5000`` ``usd`` is $50.00, ``5000`` ``jpy`` is ¥5000, ``5000`` ``kwd`` is
5.000 KWD. Shown as "5000 usd" a support person reads five thousand dollars. Everything a person
reads (the support pages, the ``dunning`` command's text output, the bad-debt alerts and
settlement details, stored reasons, /pay-bad-debt's refusal reason) goes through ``money``; the
JSON APIs keep the integers (the contract).

Pure: no I/O, no locale. No thousands separators: the pages list amounts separated by ", ".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def _codes(listed: str) -> frozenset[str]:
    return frozenset(listed.split())


# Stripe's zero-decimal currencies (https://docs.stripe.com/currencies#zero-decimal): the amount is
# already in major units. (ISK, HUF and TWD are two-decimal in Stripe's API, whatever their ISO exponent.)
ZERO_DECIMAL = _codes("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf")
# Stripe's three-decimal currencies.
THREE_DECIMAL = _codes("bhd jod kwd omr tnd")
# The rest of Stripe's presentment currencies: two decimals. A code in none of these sets is shown
# in minor units, named as such, rather than with a guessed exponent.
TWO_DECIMAL = _codes("""
    usd aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bmd bnd bob brl bsd btn bwp byn bzd cad
    cdf chf cny cop crc cve czk dkk dop dzd egp etb eur fjd fkp gbp gel ghs gip gmd gtq gyd hkd hnl hrk
    htg huf idr ils inr isk jmd kes kgs khr kyd kzt lak lbp lkr lrd lsl mad mdl mkd mmk mnt mop mro mru
    mur mvr mwk mxn myr mzn nad ngn nio nok npr nzd pab pen pgk php pkr pln qar ron rsd rub sar sbd scr
    sek sgd shp sle sll sos srd std stn svc szl thb tjs top try ttd twd tzs uah uyu uzs ves wst xcd xcg
    yer zar zmw
""")

_CODE = re.compile(r"[A-Za-z]{3}")


def exponent(currency: str | None) -> int | None:
    """How many decimals the currency's minor units have in Stripe's amounts, or None when unknown."""
    code = (currency or "").strip().lower()
    if code in ZERO_DECIMAL:
        return 0
    if code in THREE_DECIMAL:
        return 3
    if code in TWO_DECIMAL:
        return 2
    return None


def _code_shown(currency: str | None) -> str:
    code = (currency or "").strip()
    if not code:
        return "(no currency)"
    # A code as Stripe writes them, upper-cased; anything else quoted as it is (never interpreted).
    return code.upper() if _CODE.fullmatch(code) else ascii(code)


def money(amount: Any, currency: str | None) -> str:
    """``amount`` (integer minor units) of ``currency`` for a person: "50.00 USD", "5000 JPY",
    "1.500 KWD", "-12.34 EUR". An unknown currency, or an amount that is no whole number, is shown
    as it is with the words "minor units", never with a guessed exponent, and never raises."""
    decimals = exponent(currency)
    code = _code_shown(currency)
    if isinstance(amount, bool) or not isinstance(amount, int):
        # Quoted when it holds anything but printable text: the words end up in stored alerts and a
        # terminal, where a control character must not act.
        shown = str(amount)
        return f"{shown if shown.isprintable() else ascii(shown)} {code} (minor units)"
    if decimals is None:
        return f"{amount} {code} (minor units)"
    sign = "-" if amount < 0 else ""
    if decimals == 0:
        return f"{sign}{abs(amount)} {code}"
    major, minor = divmod(abs(amount), 10 ** decimals)
    return f"{sign}{major}.{minor:0{decimals}d} {code}"


def owed(outstanding: list[Mapping[str, Any]] | None) -> str:
    """What an account owes, one amount per currency ("10.00 EUR, 10.00 USD"): never summed across them."""
    if outstanding is None:
        return "not known"
    return ", ".join(money(o.get("amount"), o.get("currency")) for o in outstanding) or "nothing"


# A reason's facts that are amounts in the minor units of its fact "currency" (app/domain/compute.py:
# the balance a rule compared, and the small-balance threshold it was compared with).
AMOUNT_FACTS = ("balance", "threshold")


def facts_shown(facts: Mapping[str, Any]) -> dict[str, Any]:
    """A reason's facts with its amounts in major units of the fact "currency" (the other facts as they
    are): what the support page and ``dunning recompute`` print. The stored facts stay integers."""
    currency = facts.get("currency")
    if not isinstance(currency, str):
        return dict(facts)
    return {k: money(v, currency) if k in AMOUNT_FACTS and isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in facts.items()}
