"""Queues by kind of work, routed by task name."""

RECOMPUTE = "recompute"
PAYMENTS = "payments"
SWEEPS = "sweeps"
OUTBOX = "outbox"
MAINTENANCE = "maintenance"
ALL = (RECOMPUTE, PAYMENTS, SWEEPS, OUTBOX, MAINTENANCE)

ROUTES = {
    "tasks.recompute_account": {"queue": RECOMPUTE},
    "tasks.dispatch_due_retries": {"queue": PAYMENTS},
    "tasks.retry_payment": {"queue": PAYMENTS},
    "tasks.fetch_attempt_detail": {"queue": PAYMENTS},
    "tasks.fetch_invoice_lines": {"queue": PAYMENTS},
    "tasks.settle_bad_debt_payment": {"queue": PAYMENTS},
    "tasks.settle_unsettled_bad_debt_payments": {"queue": PAYMENTS},
    "tasks.reconcile_bad_debt_payment": {"queue": PAYMENTS},
    "tasks.reconcile_bad_debt_payments": {"queue": PAYMENTS},
    "tasks.bad_debt_overpayment_refunded": {"queue": PAYMENTS},
    "tasks.bad_debt_refund_after_settlement_reviewed": {"queue": PAYMENTS},
    "tasks.bad_debt_dispute_reviewed": {"queue": PAYMENTS},
    "tasks.relay_outbox": {"queue": OUTBOX},
    "tasks.deliver_account_outbox": {"queue": OUTBOX},
    "tasks.drift_sweep": {"queue": SWEEPS},
    "tasks.sweep_batch": {"queue": SWEEPS},
    "tasks.check_rollout_gate": {"queue": SWEEPS},
    "tasks.refile_mirror": {"queue": SWEEPS},
    "tasks.redrive_requests": {"queue": MAINTENANCE},
    "tasks.redrive_stuck": {"queue": MAINTENANCE},
    "tasks.prune_history": {"queue": MAINTENANCE},
    "tasks.*": {"queue": MAINTENANCE},
}
