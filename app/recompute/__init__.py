"""gather -> compute -> apply -> emit for one account, in one transaction (see service.py)."""
