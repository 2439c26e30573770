"""Stripe webhook ingest: verify, store once, mirror, commit, then enqueue one recompute."""
