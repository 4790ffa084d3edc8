"""RefStream eval package."""
