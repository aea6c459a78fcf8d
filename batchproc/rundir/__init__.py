"""The run directory: every name in it, atomic writes, the lock, the run's states. No torch."""
