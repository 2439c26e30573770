"""Fakes for the edges only (the Stripe API, Account Management): small real HTTP servers."""
