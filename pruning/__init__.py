"""RefStream pruning package."""
