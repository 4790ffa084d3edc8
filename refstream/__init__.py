"""RefStream: referring video object segmentation with LiteLVLM token pruning in front of VideoGLaMM.

The Python API (see :mod:`refstream.api`)::

    import refstream
    segmenter = refstream.load("tiny")
    result = segmenter.segment("examples/bedroom.mp4", ["the bed"], budget=81)
    for frame_index, masks in segmenter.stream("examples/bedroom.mp4", ["the bed"]):
        ...
"""

__version__ = "0.1.0"

#: public names resolved on first use: importing :mod:`refstream` (e.g. for ``refstream.errors`` or the
#: service client) must not load torch and transformers
_API = {
    "load": "refstream.api", "Segmenter": "refstream.api", "Segmentation": "refstream.api",
    "RunOptions": "refstream.options", "JobOptions": "refstream.options",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib  # lazy by design: see _API

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'refstream' has no attribute {name!r}")
