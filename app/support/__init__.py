"""NinjaPanel support: the recompute button, task status, and the per-account support page."""
