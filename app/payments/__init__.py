"""Payment retries: beat dispatches due retries (rows, never long countdowns), a task charges each once."""
