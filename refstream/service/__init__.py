"""The RefStream service: Redis job queue, workers, client."""
