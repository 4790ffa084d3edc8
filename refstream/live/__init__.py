"""Live tracking: a live video source segmented frame by frame, re-prompted by text (see :mod:`refstream.live.engine`)."""
