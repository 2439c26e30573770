"""subs_mandate as dunning sees each payment method: usable, blocked, needs_action, expired, detached."""

from __future__ import annotations

from datetime import datetime

from app.domain.decline_codes import deciding
from app.domain.snapshot import Snapshot
from app.domain.state import FailureClass, MandateState


def mandates(snapshot: Snapshot, now: datetime) -> tuple[MandateState, ...]:
    out = []
    for pm in sorted(snapshot.payment_methods, key=lambda p: p.id):
        failures = [a for a in snapshot.attempts
                    if a.payment_method_id == pm.id and a.failed and a.attempted_at >= pm.changed_at]
        last = max(failures, key=lambda a: a.attempted_at) if failures else None
        status, reason = "usable", None
        if not pm.attached:
            status, reason = "detached", "detached from the customer"
        elif pm.expired(now):
            status, reason = "expired", f"card expired {pm.exp_month:02d}/{pm.exp_year}"
        elif last is not None:
            cls, deciding_code = deciding(last.decline_code, last.failure_code, last.advice_code)
            code = deciding_code or last.decline_code or last.failure_code or last.advice_code
            if cls == FailureClass.PERMANENT:
                status, reason = "blocked", f"permanent decline: {code}"
            elif cls == FailureClass.ACTION_REQUIRED:
                status, reason = "needs_action", f"customer action required: {code}"
        out.append(MandateState(
            payment_method_id=pm.id, type=pm.type, status=status, status_reason=reason,
            is_default=pm.id == snapshot.default_of(pm.stripe_customer_id)[0], card_brand=pm.card_brand,
            card_last4=pm.card_last4, exp_month=pm.exp_month, exp_year=pm.exp_year,
        ))
    return tuple(out)
