"""RefStream video_pipeline package."""
