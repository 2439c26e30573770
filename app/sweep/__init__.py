"""The drift sweep: find accounts whose stored dunning state disagrees with compute (DESIGN section 6)."""
