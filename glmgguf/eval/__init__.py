"""Degeneration evaluation: loop probes on llama-server, loop detection, run statistics and comparison."""
