"""The pure dunning domain: no database, no clock, no network, no framework imports.

``compute(snapshot, policy, now)`` is the whole decision; everything else in the product gathers
its inputs or carries out its result.
"""
