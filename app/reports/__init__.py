"""Reports printed by the ``dunning report`` commands."""
