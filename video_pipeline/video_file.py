"""Video-file sources: container validation with PyAV, then exact frame reads with PyAV or decord.

Frame ``i`` is the ``i``-th frame in presentation order (sorted by pts), as decord numbers frames.
``decord`` is imported only when a :class:`DecordVideo` is opened (see there).
"""

from __future__ import annotations

import bisect
import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from refstream_errors import option
from video_pipeline.source import VideoSource, input_error

_OVERSHOOT = object()
log = logging.getLogger("refstream.decode")

REENCODE = "re-download the file, or re-encode it: ffmpeg -i <in> -c:v libx264 -pix_fmt yuv420p <out>.mp4"


@dataclass(frozen=True)
class ContainerInfo:
    """What :func:`probe` learnt about a video file.

    Attributes:
        num_frames: frames in the first video stream (demuxed packets; edit-list discards excluded).
        fps: average frame rate (frames/s) or ``None`` when the container does not say.
        height, width: size of the first frame as displayed (after ``rotation``), pixels: the size every frame
            is read at.
        pts: presentation timestamps of the frames in presentation order (stream time base), or ``None``
            when some packet has no pts (then frames are counted while decoding from the start).
        keyframes: presentation-order positions of keyframes (sorted; always starts with 0).
        seek_ts: per keyframe, the timestamp to seek to (its packet's dts, else pts; stream time base).
        rotation: degrees (0, 90, 180 or 270) the stored frames are turned counter-clockwise to be displayed,
            from the stream's display matrix (FFmpeg's ``av_display_rotation_get`` rounded to a quarter turn, as
            the ffmpeg command line's autorotate applies it; a phone's portrait video is 90 or 270).
        stored_height, stored_width: size of the first frame as stored (before ``rotation``), pixels.
        sizes: the stored (width, height) of the keyframes, in order of first appearance: more than one when the
            resolution changes mid-stream (e.g. concatenated MPEG-TS segments).
    """

    num_frames: int
    fps: float | None
    height: int
    width: int
    pts: tuple[int, ...] | None
    keyframes: tuple[int, ...]
    seek_ts: tuple[int, ...]
    rotation: int = 0
    stored_height: int = 0
    stored_width: int = 0
    sizes: tuple[tuple[int, int], ...] = ()


#: the largest frame taken, in pixels: 8K UHD (7680 x 4320 = 33,177,600); checked from the headers, before
#: anything is decoded (a 20000x10000 frame would need 600 MB per RGB frame)
MAX_PIXELS = 7680 * 4320


def check_frame_size(path: Path, width: int, height: int, max_pixels: int | None = MAX_PIXELS) -> None:
    """Refuse frames above ``max_pixels`` (None: no limit), before any decoding.

    Raises:
        InputError: naming the size, the limit and the fix.
    """
    if max_pixels is not None and width * height > max_pixels:
        raise input_error(
            path, f"frames are {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            f"(8K is {MAX_PIXELS:,})", "downscale first, e.g. ffmpeg -i IN -vf scale=1920:-2 OUT (or frames "
            f"with Pillow), or raise the limit: {option('max_pixels', width * height)}")


def iso_box_truncation(path: Path) -> str | None:
    """For an MP4/MOV (ISO base media) file: which top-level box runs past the end of the file, else None.

    Walks the top-level boxes (32-bit size + 4-byte type; size 1 = a 64-bit size follows, 0 = to the end of
    the file; ISO/IEC 14496-12 section 4.2) without reading their contents. A file cut inside its ``moov`` box
    opens in FFmpeg with only some of its tracks, which would otherwise read as "no video stream".
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
                return None
            offset = 0
            while offset + 8 <= size:
                fh.seek(offset)
                header = fh.read(16)
                box_size, kind = int.from_bytes(header[:4], "big"), header[4:8].decode("latin-1")
                if box_size == 1 and len(header) >= 16:
                    box_size = int.from_bytes(header[8:16], "big")
                elif box_size == 0:
                    return None
                if box_size < 8:
                    return None  # not a box structure we can follow
                if offset + box_size > size:
                    return (f"the '{kind}' box at byte {offset:,} declares {box_size:,} bytes but the file ends after "
                            f"{size - offset:,} of them (the file is {size:,} bytes)")
                offset += box_size
    except OSError:
        return None
    return None


def probe(path: Path, max_pixels: int | None = MAX_PIXELS) -> ContainerInfo:
    """Validate a video file with PyAV and index its first video stream.

    Opens the container, requires a video stream, checks the frame size against ``max_pixels`` (from the
    headers), demuxes every packet of it (no decoding) to count the frames and locate keyframes, and decodes
    the first frame.

    Raises:
        InputError: not a container FFmpeg can read, no video stream, frames above ``max_pixels``, no frames,
            the first frame does not decode, or the file is truncated/corrupt (fewer packets than the container
            index lists).
    """
    def open_container():
        try:
            return av.open(str(path), metadata_errors="ignore")
        except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
            truncated = iso_box_truncation(path)
            if truncated:
                raise input_error(path, f"truncated file: {truncated}", REENCODE) from e
            raise input_error(
                path,
                f"not a video FFmpeg can read, or truncated/corrupt ({_describe(e)})",
                "check that this is a video file (mp4, mkv, webm, avi, ...); if it is, " + REENCODE,
            ) from e

    with open_container() as container:
        if not container.streams.video:
            truncated = iso_box_truncation(path)
            if truncated:
                raise input_error(path, f"truncated file: {truncated}", REENCODE)
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise input_error(
                path,
                f"file has no video stream (streams: {', '.join(kinds)})",
                "pass a file with a video track or a folder of JPEG/PNG frames",
            )
        stream = container.streams.video[0]
        check_frame_size(path, stream.codec_context.width, stream.codec_context.height, max_pixels)
        declared = int(stream.frames or 0)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else None
        packets: list[tuple[int | None, int | None, bool]] = []
        total = 0
        last_corrupt = False
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # flush packet at the end of the stream
                    continue
                total += 1
                last_corrupt = packet.is_corrupt
                if not packet.is_discard:
                    packets.append((packet.pts, packet.dts, packet.is_keyframe))
        except av.FFmpegError as e:
            raise input_error(
                path, f"corrupt video: demuxing failed after {total} packets ({_describe(e)})", REENCODE
            ) from e
    if last_corrupt or (declared and total < declared):
        present = f"the data stops inside packet {total}" if last_corrupt else f"only {total} are present"
        raise input_error(
            path, f"truncated video: the container lists {declared or '?'} frames but {present}", REENCODE
        )
    if not packets:
        raise input_error(path, "the video stream has no frames", REENCODE)

    with open_container() as container:
        stream = container.streams.video[0]
        frames = container.decode(stream)
        try:
            first = next(frames)
        except (av.FFmpegError, StopIteration) as e:
            raise input_error(path, f"the first frame does not decode ({_describe(e)})", REENCODE) from e
        stored_height, stored_width = first.height, first.width
        rotation = quarter_turns(first.rotation) * 90
        sizes = keyframe_sizes(stream, frames, (stored_width, stored_height))
    height, width = (stored_width, stored_height) if rotation in (90, 270) else (stored_height, stored_width)

    if any(p is None for p, _, _ in packets) or len({p for p, _, _ in packets}) != len(packets):
        pts, keyframes, seek_ts = None, (0,), (0,)  # no usable timestamps: always decode from the start
    else:
        ordered = sorted(packets, key=lambda packet: packet[0])
        pts = tuple(p for p, _, _ in ordered)
        keys = [(k, p if d is None else d) for k, (p, d, key) in enumerate(ordered) if key and k > 0]
        keyframes = (0, *(k for k, _ in keys))
        seek_ts = (0, *(ts for _, ts in keys))  # position 0 is reached by reopening the file
    return ContainerInfo(len(packets), fps, height, width, pts, keyframes, seek_ts, rotation, stored_height,
                         stored_width, sizes)


def quarter_turns(degrees: float | None) -> int:
    """A display rotation (degrees counter-clockwise, FFmpeg's ``av_display_rotation_get``; None: none) as
    quarter turns 0..3 for ``np.rot90`` (which turns counter-clockwise), rounded to the nearest quarter."""
    return int(round((degrees or 0) / 90.0)) % 4


def keyframe_sizes(stream, frames, first: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """The stored (width, height) of every keyframe, in order of first appearance, ``first`` first.

    Continues the decode iterator ``frames`` of ``stream`` with ``skip_frame = "NONKEY"``: FFmpeg then decodes
    only keyframes (about one frame per GOP: 0.17 s for a minute of 1080p30 H.264 with 8 keyframes, measured
    beside a 0.06 s demux), where a codec such as H.264 or HEVC can change its resolution (a new SPS needs an
    IDR frame). A keyframe that fails to decode is skipped (the read reports it, naming the frame).
    """
    sizes = [first]
    stream.codec_context.skip_frame = "NONKEY"
    try:
        for frame in frames:
            size = (frame.width, frame.height)
            if size not in sizes:
                sizes.append(size)
    except av.FFmpegError:
        pass
    return tuple(sizes)


def _describe(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _FileSource(VideoSource):
    def __init__(self, path: Path, info: ContainerInfo):
        self.path = Path(path)
        self.info = info
        self.num_frames = info.num_frames
        self.fps = info.fps
        self.height, self.width = info.height, info.width
        self.rotation = info.rotation
        self.frame_names = [f"{i:05d}" for i in range(self.num_frames)]
        self._sizes = list(info.sizes or [(info.stored_width or info.width, info.stored_height or info.height)])
        self._damaged: set[int] = set()
        self._resized: set[int] = set()

    @property
    def frame_sizes(self) -> list[tuple[int, int]]:
        return list(self._sizes)

    @property
    def frames_damaged(self) -> int | None:
        return len(self._damaged)

    @property
    def frames_resized(self) -> int:
        return len(self._resized)


class PyAVVideo(_FileSource):
    """A video file read with PyAV (FFmpeg), exact frames by seek-to-keyframe + decode forward.

    Build with :func:`video_pipeline.decode.open_video` (``decoder="pyav"``). The decoder state is kept
    between calls: reading sorted indices (or consecutive :meth:`iter_chunks`) is one forward pass; a
    seek happens only when the target lies behind the decoder or a keyframe lies between it and the
    target. Decoding uses ``thread_type="AUTO"`` (``"SLICE"`` from the first damaged frame on, see
    :meth:`_read_sorted`). Frames are converted to RGB24 by FFmpeg's swscale at the first frame's stored size
    (a frame of another size, after a mid-stream resolution change, is resized to it and counted in
    ``frames_resized``), then turned by ``rotation`` (``np.rot90``) into display orientation.
    A frame FFmpeg decoded with errors (``frame.is_corrupt``: its ``decode_error_flags`` or the corrupt flag;
    FFmpeg conceals the damage) is counted in ``frames_damaged``; FFmpeg's own log lines stay silent (PyAV
    does not forward them unless ``av.logging`` is configured).

    Raises (when reading): InputError naming the frame index when FFmpeg fails or the frame is missing.
    """

    decoder_used = "pyav"

    def __init__(self, path: Path, info: ContainerInfo):
        super().__init__(path, info)
        self._container = None
        self._position = {p: k for k, p in enumerate(info.pts)} if info.pts is not None else None
        self._frames = None  # decode iterator, or None when a seek is needed
        self._last = -1  # presentation position of the last decoded frame
        self._thread_type = "AUTO"  # frame + slice threads; "SLICE" (one frame at a time) once a frame is damaged
        self._open()

    def _open(self) -> None:
        if self._container is not None:
            self._container.close()
        try:
            self._container = av.open(str(self.path), metadata_errors="ignore")
        except (av.FFmpegError, OSError) as e:
            raise input_error(self.path, f"cannot reopen the video ({_describe(e)})", REENCODE) from e
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = self._thread_type

    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        out = np.empty((len(indices), self.height, self.width, 3), dtype=np.uint8)
        turns = quarter_turns(self.rotation)
        stored_width, stored_height = self._sizes[0]
        for k, i in enumerate(indices):
            try:
                frame = self._frame_at(i)
                if frame.is_corrupt and self._thread_type != "SLICE":
                    # with frame threads FFmpeg's concealment of damaged data, and which frames it flags, depend on
                    # thread timing (6 to 9 of 30 frames flagged over runs of one file): from the keyframe before
                    # this frame on, decode one frame at a time, reproducibly
                    self._thread_type = "SLICE"
                    self._open()
                    self._frames = None
                    frame = self._frame_at(i)
                if frame.is_corrupt:
                    self._damaged.add(i)
                if (frame.width, frame.height) != (stored_width, stored_height):
                    self._resized.add(i)
                    if (frame.width, frame.height) not in self._sizes:
                        self._sizes.append((frame.width, frame.height))
                rgb = frame.to_ndarray(format="rgb24", width=stored_width, height=stored_height)
                out[k] = np.rot90(rgb, turns) if turns else rgb
            except av.FFmpegError as e:
                self._frames = None
                raise input_error(self.path, f"cannot decode frame {i} ({_describe(e)})", REENCODE) from e
        return out

    def _restart(self, keyframe: int) -> None:
        """Position the decoder at the ``keyframe``-th keyframe (0: reopen the file, the surest rewind)."""
        if keyframe == 0:
            self._open()
        else:
            ts = self.info.seek_ts[keyframe]
            self._container.seek(ts, stream=self._stream, backward=True, any_frame=False)
        self._frames = iter(self._container.decode(self._stream))
        self._last = self.info.keyframes[keyframe] - 1  # earlier frames may still come out: skipped

    def _frame_at(self, index: int):
        keyframe = bisect.bisect_right(self.info.keyframes, index) - 1  # the last keyframe <= index
        if self._frames is None or index <= self._last or self.info.keyframes[keyframe] > self._last + 1:
            self._restart(keyframe)
        frame = self._scan(index)
        if frame is _OVERSHOOT and keyframe > 0:  # the seek landed after the target: start over
            self._restart(0)
            frame = self._scan(index)
        if frame is None or frame is _OVERSHOOT:
            self._frames = None
            raise input_error(
                self.path,
                f"frame {index} of {self.num_frames} could not be decoded (the stream ended or skipped it)",
                REENCODE,
            )
        return frame

    def _scan(self, index: int):
        """Decode forward to frame ``index``: the frame, ``_OVERSHOOT`` if passed, ``None`` at the end."""
        for frame in self._frames:
            if self._position is None:
                self._last += 1
                position = self._last
            else:
                position = self._position.get(frame.pts)
                if position is None:
                    continue  # a frame the index does not list (e.g. edit-list leftovers)
                self._last = position
            if position == index:
                return frame
            if position > index:
                return _OVERSHOOT
        return None

    def close(self) -> None:
        if not self._closed and self._container is not None:
            self._frames = None
            self._container.close()
        super().close()


class _DecordErrors:
    """Counts the errors decord's own FFmpeg logs, and keeps its log lines off stderr.

    decord (the ``decord2`` wheel) links its own copy of FFmpeg, whose ``av_log`` writes lines such as
    ``[h264 @ 0x...] error while decoding MB 3 3`` straight to stderr. :func:`install` replaces that copy's log
    callback (``av_log_set_callback`` of the ``libavutil`` decord loaded, through ctypes) with one that only
    counts messages at ``AV_LOG_ERROR`` or worse; the count tells :class:`DecordVideo` that a frame it read
    may be damaged. PyAV's FFmpeg is another copy and is not touched. When decord's libavutil cannot be found
    (another build of decord), its log level is set to quiet instead and ``available`` stays False.
    """

    AV_LOG_ERROR = 16
    available = False
    count = 0
    _callback = None  # the ctypes function pointer: kept alive as long as FFmpeg may call it

    @classmethod
    def install(cls) -> None:
        if cls._callback is not None or getattr(cls, "_tried", False):
            return
        cls._tried = True
        import decord  # lazy: decord is optional (PyAV reads every file without it), as in DecordVideo
        import decord.logging  # lazy: same

        library = cls._find_libavutil(decord)
        if library is None:
            decord.logging.set_level(decord.logging.QUIET)
            return
        try:
            avutil = ctypes.CDLL(library)
            callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

            def on_log(_avcl, level, _fmt, _args):  # called from FFmpeg's decoding threads too
                if level <= cls.AV_LOG_ERROR:
                    cls.count += 1

            cls._callback = callback_type(on_log)
            avutil.av_log_set_callback(cls._callback)
        except (OSError, AttributeError):
            decord.logging.set_level(decord.logging.QUIET)
            return
        decord.logging.set_level(decord.logging.ERROR)  # warnings and info never reach the callback
        cls.available = True

    @staticmethod
    def _find_libavutil(decord) -> str | None:
        """The path of the libavutil that decord's ``libdecord.so`` loaded (from /proc/self/maps on Linux)."""
        here = Path(decord.__file__).resolve().parent
        try:
            with open("/proc/self/maps") as fh:
                paths = {line.split()[-1] for line in fh if "libavutil" in line and "/" in line}
        except OSError:
            paths = set()
        site = here.parent
        for path in sorted(paths):
            if Path(path).parent.name.startswith("decord") and Path(path).parent.parent == site:
                return path
        return None


class DecordVideo(_FileSource):
    """A video file read with decord (``decord.VideoReader(path, ctx=cpu(0))``, ``get_batch``).

    Build with :func:`video_pipeline.decode.open_video` (``decoder="decord"``, the default). The file has
    already passed :func:`probe`; ``num_frames`` is PyAV's count, capped by decord's own length. Works
    whatever ``decord.bridge`` is set to (native NDArray or torch). decord applies the display rotation
    itself; for a rotated file its first frame is checked against PyAV's (turned by ``rotation``) at open.

    When decord fails on a frame that PyAV decodes (a VP9 ``-deadline realtime`` file, frames of another size
    than the stream header says) or its FFmpeg reports a decoding error (a damaged frame, which decord would
    replace by a copy of a neighbour: see :class:`_DecordErrors`), these and the later frames are read with
    :class:`PyAVVideo` instead, with one warning (``decoder_used`` becomes ``"pyav"``; PyAV counts the damaged
    frames); only a frame neither decodes raises. A file whose resolution changes mid-stream is never given to
    decord (it repeats the last frame of the first size): :func:`video_pipeline.decode.open_video` opens it
    with PyAV.

    Raises: InputError when decord cannot open the file or disagrees with PyAV on a rotated first frame
    (:func:`video_pipeline.decode.open_video` then opens it with PyAV), or naming the frame when neither
    decoder reads it.
    """

    decoder_used = "decord"

    def __init__(self, path: Path, info: ContainerInfo):
        # lazy: decord loads its own FFmpeg build (~0.1 s); runs with decoder="pyav" never need it
        import decord

        _DecordErrors.install()
        super().__init__(path, info)
        self._info = info
        self._fallback: PyAVVideo | None = None
        self._errors_seen = _DecordErrors.count
        try:
            self._reader = decord.VideoReader(str(self.path), ctx=decord.cpu(0))
        except (decord.DECORDError, RuntimeError) as e:
            raise input_error(
                self.path,
                f"decord cannot open the video ({_describe(e)})",
                f"open it with {option('decoder', 'pyav')}, or " + REENCODE,
            ) from e
        if len(self._reader) < self.num_frames:
            self.num_frames = len(self._reader)
            self.frame_names = self.frame_names[: self.num_frames]
        if self.rotation:
            self._check_rotation()

    def _check_rotation(self) -> None:
        """decord turns rotated videos itself: check its first frame against PyAV's, turned by ``rotation``."""
        with PyAVVideo(self.path, self._info) as reference:
            expected = reference.read([0])[0].astype(np.int16)
        got = self._batch([0])
        if got is None or got.shape[1:3] != expected.shape[:2] or np.abs(got[0].astype(np.int16) - expected).mean() > 4:
            raise input_error(self.path, f"decord does not turn this video by its {self.rotation}-degree display "
                              "rotation as FFmpeg does", f"open it with {option('decoder', 'pyav')}")

    def _batch(self, indices: list[int]) -> np.ndarray | None:
        """decord's frames, or None when decord fails."""
        import decord  # lazy, see __init__ (already loaded there: a dictionary lookup)

        try:
            batch = self._reader.get_batch(indices)
        except (decord.DECORDError, RuntimeError, IndexError):
            return None
        frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        return np.ascontiguousarray(frames, dtype=np.uint8)

    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        import decord  # lazy, see __init__ (already loaded there: a dictionary lookup)

        if self._fallback is not None:
            return self._fallback._read_sorted(indices)
        try:
            batch = self._reader.get_batch(indices)
        except (decord.DECORDError, RuntimeError, IndexError) as e:
            return self._switch_to_pyav(indices, f"decord cannot decode frame {indices[0]} ({_describe(e)})")
        frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        if frames.shape[1:3] != (self.height, self.width):
            return self._switch_to_pyav(indices, f"decord returned {frames.shape[2]}x{frames.shape[1]} frames, "
                                                 f"expected {self.width}x{self.height}")
        if _DecordErrors.count != self._errors_seen:
            return self._switch_to_pyav(indices, f"FFmpeg reported {_DecordErrors.count - self._errors_seen} "
                                                 f"decoding error(s) by frame {indices[-1]} (damaged data)",
                                        quiet=True)  # the run's one damaged-frames line reports it
        return np.ascontiguousarray(frames, dtype=np.uint8)

    def _switch_to_pyav(self, indices: list[int], problem: str, quiet: bool = False) -> np.ndarray:
        """Read these and all later frames with PyAV (one warning, or a debug line when ``quiet``: damaged data,
        which the run reports in its one ``frames_damaged`` line); raises only when PyAV fails too."""
        log.log(logging.DEBUG if quiet else logging.WARNING, "%s: %s; reading the video with PyAV instead",
                self.path, problem)
        self._fallback = PyAVVideo(self.path, self._info)
        self.decoder_used = "pyav"
        return self._fallback._read_sorted(indices)

    @property
    def frame_sizes(self) -> list[tuple[int, int]]:
        return self._fallback.frame_sizes if self._fallback is not None else super().frame_sizes

    @property
    def frames_damaged(self) -> int | None:
        if self._fallback is not None:
            return self._fallback.frames_damaged  # decord's frames before the switch had no reported error
        return 0 if _DecordErrors.available else None

    @property
    def frames_resized(self) -> int:
        return self._fallback.frames_resized if self._fallback is not None else 0

    def close(self) -> None:
        if not self._closed:
            del self._reader
            if self._fallback is not None:
                self._fallback.close()
        super().close()
