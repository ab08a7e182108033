"""One module per bench entry, each defining ``ENTRY`` (see bench.harness)."""
