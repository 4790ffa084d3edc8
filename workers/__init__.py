"""RefStream workers package."""
