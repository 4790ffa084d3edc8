"""RefStream: referring video object segmentation with LiteLVLM token pruning in front of VideoGLaMM."""

__version__ = "0.1.0"
