"""HTTP API blueprints (JSON)."""
