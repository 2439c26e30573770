"""Which payment method the isolated bad-debt payment charges (app/payments/bad_debt.py)."""

from __future__ import annotations

from app.domain.snapshot import CustomerDefault
from app.payments.bad_debt import _method_to_charge
from tests.unit.builders import NOW, days, invoice, method, snapshot


def _two_customers(defaults: tuple[CustomerDefault, ...]):
    methods = (method("pm_1_old", changed_days_ago=40, stripe_customer_id="cus_1"),
               method("pm_1_new", changed_days_ago=20, stripe_customer_id="cus_1"),
               method("pm_1_gone", changed_days_ago=10, attached=False, stripe_customer_id="cus_1"),
               method("pm_2", changed_days_ago=1, stripe_customer_id="cus_2"))
    return snapshot(invoice(stripe_customer_id="cus_1"), payment_methods=methods,
                    default_payment_method_id=defaults[0].payment_method_id if defaults else None,
                    default_payment_method_changed_at=days(1), customer_defaults=defaults)


def test_the_debtors_own_default_is_charged_not_the_accounts_newest():
    snap = _two_customers((CustomerDefault("cus_2", "pm_2", days(1)), CustomerDefault("cus_1", "pm_1_old", days(40))))
    assert _method_to_charge(snap, "cus_1", NOW) == "pm_1_old"
    assert _method_to_charge(snap, "cus_2", NOW) == "pm_2"


def test_without_a_default_the_debtors_latest_attached_method_is_charged():
    snap = _two_customers((CustomerDefault("cus_2", "pm_2", days(1)),))
    assert _method_to_charge(snap, "cus_1", NOW) == "pm_1_new"


def test_a_customer_with_no_method_of_its_own_has_nothing_to_charge():
    snap = _two_customers((CustomerDefault("cus_2", "pm_2", days(1)),))
    assert _method_to_charge(snap, "cus_3", NOW) is None
