"""Staged remediation rollout: its state, history and gate (DESIGN section 6)."""
