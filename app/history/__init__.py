"""History retention: removing the bookkeeping rows nothing reads any more (``dunning history prune``)."""
