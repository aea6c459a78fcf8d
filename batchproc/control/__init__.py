"""From an experiment file to an exit code: the CLI, the config, the launcher, supervision. No torch."""
