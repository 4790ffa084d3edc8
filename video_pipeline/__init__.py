"""RefStream video_pipeline package: decode frames, plan which frames each model sees, preprocess them.

* :mod:`video_pipeline.decode` - :func:`open_video` -> :class:`VideoSource` (video file via decord or
  PyAV, or a folder of JPEG/PNG frames); exact frame reads and chunked streaming.
* :mod:`video_pipeline.plan` - :func:`plan_frames` -> :class:`FramePlan` (SAM2 frames and the 16
  encoder frames, VideoGLaMM's sampling rule).
* :mod:`video_pipeline.preprocess` - ``clip_preprocess``, ``internvideo_preprocess``,
  ``sam2_preprocess`` (imports torch; import it explicitly).
"""

from video_pipeline.decode import FrameFolder, VideoSource, open_video
from video_pipeline.plan import FramePlan, plan_frames

__all__ = ["FramePlan", "FrameFolder", "VideoSource", "open_video", "plan_frames"]
