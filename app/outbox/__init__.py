"""Delivering the outbox of domain events to Account Management."""
