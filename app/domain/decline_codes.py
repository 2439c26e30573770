"""Failure class of a failed payment attempt, from Stripe's decline, failure and advice codes.

Table-driven. Stripe's enums are open: a value never seen before classifies as ``unknown``
(retried like a transient failure, with a smaller budget) and never raises.
"""

from __future__ import annotations

from app.domain.state import FailureClass

PERMANENT = FailureClass.PERMANENT
ACTION = FailureClass.ACTION_REQUIRED
TRANSIENT = FailureClass.TRANSIENT
UNKNOWN = FailureClass.UNKNOWN

# Issuer decline codes (charge.outcome / last_payment_error.decline_code).
DECLINE_CODES: dict[str, FailureClass] = {
    # the same method will not work again
    "expired_card": PERMANENT,
    "lost_card": PERMANENT,
    "stolen_card": PERMANENT,
    "pickup_card": PERMANENT,
    "incorrect_number": PERMANENT,
    "invalid_number": PERMANENT,
    "invalid_account": PERMANENT,
    "restricted_card": PERMANENT,
    "revocation_of_authorization": PERMANENT,
    "revocation_of_all_authorizations": PERMANENT,
    "card_not_supported": PERMANENT,
    "currency_not_supported": PERMANENT,
    "fraudulent": PERMANENT,
    "merchant_blacklist": PERMANENT,
    "do_not_try_again": PERMANENT,
    "security_violation": PERMANENT,
    "stop_payment_order": PERMANENT,
    "new_account_information_available": PERMANENT,
    "no_action_taken": PERMANENT,
    "account_closed": PERMANENT,
    # the customer must act
    "authentication_required": ACTION,
    "authentication_not_handled": ACTION,
    "mobile_device_authentication_required": ACTION,
    "incorrect_cvc": ACTION,
    "invalid_cvc": ACTION,
    "incorrect_zip": ACTION,
    "incorrect_address": ACTION,
    "incorrect_pin": ACTION,
    "invalid_pin": ACTION,
    "offline_pin_required": ACTION,
    "online_or_offline_pin_required": ACTION,
    "pin_try_exceeded": ACTION,
    "invalid_expiry_month": ACTION,
    "invalid_expiry_year": ACTION,
    "testmode_decline": ACTION,
    # The issuer does not allow this kind of charge on the card (online, recurring, foreign, this
    # merchant category): Stripe's next step is the customer contacting the issuer, and the networks
    # class them as declines never to be approved as they are (Visa's category 1, response code 57),
    # whose retries draw penalties. Retried on a timer they fail every time; the customer must act
    # (lift the block, or give another method).
    "not_permitted": ACTION,
    "service_not_allowed": ACTION,
    "transaction_not_allowed": ACTION,
    # retry later on the same method
    "insufficient_funds": TRANSIENT,
    "processing_error": TRANSIENT,
    "try_again_later": TRANSIENT,
    "issuer_not_available": TRANSIENT,
    "card_velocity_exceeded": TRANSIENT,
    "withdrawal_count_limit_exceeded": TRANSIENT,
    "reenter_transaction": TRANSIENT,
    "do_not_honor": TRANSIENT,
    "generic_decline": TRANSIENT,
    "call_issuer": TRANSIENT,
    "approve_with_id": TRANSIENT,
    "duplicate_transaction": TRANSIENT,
    "invalid_amount": TRANSIENT,
}

# Stripe error / charge failure codes; consulted when there is no decline code.
FAILURE_CODES: dict[str, FailureClass] = {
    "expired_card": PERMANENT,
    "incorrect_number": PERMANENT,
    "invalid_number": PERMANENT,
    "card_not_supported": PERMANENT,
    "account_closed": PERMANENT,
    "no_account": PERMANENT,
    "debit_not_authorized": PERMANENT,
    "bank_account_restricted": PERMANENT,
    # A bank account or mandate the debit can never be taken from again (Stripe's error codes; the
    # bank debit's invalid_account): presented again, it fails again, and its bank returns cost fees.
    "account_number_invalid": PERMANENT,
    "routing_number_invalid": PERMANENT,
    "bank_account_unusable": PERMANENT,  # blocked by Stripe after a return: fails until re-verified
    "bank_account_declined": PERMANENT,
    "payment_method_bank_account_blocked": PERMANENT,
    "payment_intent_mandate_invalid": PERMANENT,
    "billing_invalid_mandate": PERMANENT,
    "sepa_unsupported_account": PERMANENT,
    "authentication_required": ACTION,
    # The payment waits for the customer's authentication (3-D Secure on an off-session charge).
    "payment_intent_action_required": ACTION,
    "invoice_payment_intent_requires_action": ACTION,
    "incorrect_cvc": ACTION,
    "invalid_cvc": ACTION,
    "incorrect_zip": ACTION,
    "invalid_expiry_month": ACTION,
    "invalid_expiry_year": ACTION,
    "payment_intent_authentication_failure": ACTION,
    "insufficient_funds": TRANSIENT,
    "processing_error": TRANSIENT,
    "rate_limit": TRANSIENT,
    "card_decline_rate_limit_exceeded": TRANSIENT,
    # "card_declined" says nothing on its own: the decline code decides, else unknown.
}

# outcome.advice_code: the network's advice overrides what the decline code suggests.
ADVICE_CODES: dict[str, FailureClass] = {
    "do_not_try_again": PERMANENT,
    "confirm_card_data": ACTION,
    "try_again_later": TRANSIENT,
}


def _lookup(table: dict[str, FailureClass], code: str | None) -> FailureClass | None:
    if not code or not isinstance(code, str):
        return None
    return table.get(code.strip().lower())


# How strict each class is: where the codes disagree, the stricter one decides. A generic decline
# (do_not_honor, generic_decline: "retry later") beside a specific failure (a bank debit's mandate
# revoked, told by its charge's failure code while its intent says generic_decline) must not keep
# retrying a method its bank says is gone.
STRICTNESS = {PERMANENT: 2, ACTION: 1, TRANSIENT: 0}


def classify(
    decline_code: str | None = None,
    failure_code: str | None = None,
    advice_code: str | None = None,
) -> FailureClass:
    """The strictest of what the network's advice code, the decline code and the failure code say (the
    two codes each looked up in either table)."""
    return deciding(decline_code, failure_code, advice_code)[0]


def deciding(
    decline_code: str | None = None,
    failure_code: str | None = None,
    advice_code: str | None = None,
) -> tuple[FailureClass, str | None]:
    """``classify``'s class, and the code that decided it (None: no code is known)."""
    # The advice tightens (do_not_try_again, confirm_card_data) but never loosens: a card reported
    # lost, stolen or fraudulent is not retried because the network said try_again_later (card
    # networks penalise retries of such declines). Listed first, it is named on a tie.
    said = [(c, code) for c, code in (
        (_lookup(ADVICE_CODES, advice_code), advice_code),
        (_lookup(DECLINE_CODES, decline_code) or _lookup(FAILURE_CODES, decline_code), decline_code),
        (_lookup(FAILURE_CODES, failure_code) or _lookup(DECLINE_CODES, failure_code), failure_code),
    ) if c is not None]
    return max(said, key=lambda pair: STRICTNESS[pair[0]], default=(UNKNOWN, None))
