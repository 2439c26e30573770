import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.domain.decline_codes import ADVICE_CODES, DECLINE_CODES, classify, deciding
from app.domain.state import FailureClass as FC


@pytest.mark.parametrize(
    ("decline", "failure", "advice", "expected"),
    [
        ("expired_card", "card_declined", None, FC.PERMANENT),
        ("lost_card", None, None, FC.PERMANENT),
        ("stolen_card", None, None, FC.PERMANENT),
        ("pickup_card", None, None, FC.PERMANENT),
        ("incorrect_number", None, None, FC.PERMANENT),
        ("revocation_of_authorization", None, None, FC.PERMANENT),
        ("fraudulent", None, None, FC.PERMANENT),
        ("do_not_try_again", None, None, FC.PERMANENT),
        ("authentication_required", None, None, FC.ACTION_REQUIRED),
        ("incorrect_cvc", None, None, FC.ACTION_REQUIRED),
        ("incorrect_zip", None, None, FC.ACTION_REQUIRED),
        ("insufficient_funds", "card_declined", None, FC.TRANSIENT),
        ("processing_error", None, None, FC.TRANSIENT),
        ("try_again_later", None, None, FC.TRANSIENT),
        ("card_velocity_exceeded", None, None, FC.TRANSIENT),
        ("do_not_honor", None, None, FC.TRANSIENT),
        ("generic_decline", None, None, FC.TRANSIENT),
        # every code DESIGN section 4 lists, in its class
        ("invalid_number", None, None, FC.PERMANENT),
        ("invalid_account", None, None, FC.PERMANENT),
        ("restricted_card", None, None, FC.PERMANENT),
        ("revocation_of_all_authorizations", None, None, FC.PERMANENT),
        ("card_not_supported", None, None, FC.PERMANENT),
        ("currency_not_supported", None, None, FC.PERMANENT),
        ("invalid_cvc", None, None, FC.ACTION_REQUIRED),
        ("issuer_not_available", None, None, FC.TRANSIENT),
        ("withdrawal_count_limit_exceeded", None, None, FC.TRANSIENT),
        ("reenter_transaction", None, None, FC.TRANSIENT),
        # card decline codes Stripe documents beside DESIGN's list: the customer must act (complete
        # 3-D Secure, fix the billing address), which no automatic retry of an off-session charge does
        ("authentication_not_handled", None, None, FC.ACTION_REQUIRED),
        ("mobile_device_authentication_required", None, None, FC.ACTION_REQUIRED),
        ("incorrect_address", None, None, FC.ACTION_REQUIRED),
        # the issuer does not allow this kind of charge on the card (Visa's never-approve category 1,
        # response 57): retrying on a timer fails every time and draws network penalties
        ("transaction_not_allowed", None, None, FC.ACTION_REQUIRED),
        ("not_permitted", None, None, FC.ACTION_REQUIRED),
        ("service_not_allowed", None, None, FC.ACTION_REQUIRED),
        # the network's advice tightens what the decline code suggests, never loosens it
        ("generic_decline", None, "do_not_try_again", FC.PERMANENT),
        ("insufficient_funds", None, "confirm_card_data", FC.ACTION_REQUIRED),
        ("do_not_honor", None, "try_again_later", FC.TRANSIENT),
        ("stolen_card", None, "try_again_later", FC.PERMANENT),
        ("pickup_card", None, "try_again_later", FC.PERMANENT),
        ("incorrect_cvc", None, "try_again_later", FC.ACTION_REQUIRED),
        (None, None, "try_again_later", FC.TRANSIENT),
        # no decline code: the failure code decides
        (None, "expired_card", None, FC.PERMANENT),
        (None, "authentication_required", None, FC.ACTION_REQUIRED),
        (None, "card_declined", None, FC.UNKNOWN),
        # a generic decline beside a specific failure (a bank debit's mandate revoked, told by its charge's
        # failure code and its intent's generic decline): the specific, stricter one decides
        ("generic_decline", "debit_not_authorized", None, FC.PERMANENT),
        ("do_not_honor", "account_closed", None, FC.PERMANENT),
        ("generic_decline", "payment_intent_authentication_failure", None, FC.ACTION_REQUIRED),
        ("insufficient_funds", "processing_error", None, FC.TRANSIENT),
        # open enums: never-seen values are unknown, never an error
        ("a_code_stripe_adds_in_2027", None, None, FC.UNKNOWN),
        (None, None, None, FC.UNKNOWN),
        ("  Expired_Card ", None, None, FC.PERMANENT),
    ],
)
def test_classify(decline, failure, advice, expected):
    assert classify(decline, failure, advice) == expected


def test_every_table_entry_has_a_class():
    assert set(DECLINE_CODES.values()) <= set(FC)
    assert set(ADVICE_CODES.values()) <= set(FC)


@given(st.one_of(st.none(), st.text()), st.one_of(st.none(), st.text()), st.one_of(st.none(), st.text(), st.integers()))
def test_any_value_classifies_without_error(decline, failure, advice):
    assert classify(decline, failure, advice) in set(FC)


def test_the_deciding_code_is_the_one_whose_class_won():
    assert deciding("generic_decline", "debit_not_authorized") == (FC.PERMANENT, "debit_not_authorized")
    assert deciding("expired_card", "card_declined") == (FC.PERMANENT, "expired_card")
    assert deciding("insufficient_funds", None, "do_not_try_again") == (FC.PERMANENT, "do_not_try_again")
    assert deciding("a_code_stripe_adds_in_2027") == (FC.UNKNOWN, None)


# Stripe's error codes (stripe-python's LastPaymentError.code enum) for a bank account or mandate the
# payment can never be taken from again: the bank debit's "invalid_account" (DESIGN 4: permanent, the
# same method will not work again). Unknown, they were retried on the unknown schedule (days 2, 5, 9),
# a debit presented again on a closed, blocked or unmandated account, and no "permanent >= 3 days" rule.
@pytest.mark.parametrize("code", ["account_number_invalid", "routing_number_invalid", "bank_account_unusable",
                                  "bank_account_declined", "payment_method_bank_account_blocked",
                                  "payment_intent_mandate_invalid", "billing_invalid_mandate",
                                  "sepa_unsupported_account"])
def test_a_bank_account_or_mandate_that_is_gone_is_permanent(code):
    assert classify(None, code, None) == FC.PERMANENT
    assert classify("generic_decline", code, None) == FC.PERMANENT  # beside the intent's generic decline


@pytest.mark.parametrize("code", ["payment_intent_action_required", "invoice_payment_intent_requires_action"])
def test_a_payment_waiting_for_the_customers_authentication_is_action_required(code):
    assert classify(None, code, None) == FC.ACTION_REQUIRED


def test_a_bank_debit_whose_mandate_is_invalid_is_not_retried_and_restricts_after_3_days():
    from app.domain.compute import compute
    from tests.unit.builders import NOW, attempt, invoice, policy, snapshot

    inv = invoice("in_1", failed_days_ago=4)
    failed = attempt("pi_1", "in_1", days_ago=4, decline=None, failure_code="payment_intent_mandate_invalid")
    decision = compute(snapshot(inv, attempts=(failed,)), policy(), NOW)
    assert decision.state.failure_class == "permanent"
    assert decision.state.next_retry_at is None
    assert decision.state.level == "restrict_premium"
