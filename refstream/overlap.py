"""Two bounded background threads that let decoding and writing overlap with SAM2.

:class:`BackgroundIterator` runs an iterable (the video decoder's chunks, SAM2-preprocessed) in a thread, at most
``maxsize`` items ahead of the consumer; :class:`BackgroundConsumer` hands items to a function (the job's
:class:`refstream.outputs.JobWriter`: RLE + overlay encoding) in a thread, at most ``maxsize`` items behind the
producer. Both keep the order of the items (one thread, one FIFO queue), re-raise an error of their thread in the
caller as the very exception object (same type, message and traceback), and leave no thread running once
closed (:meth:`close` is idempotent; use them as context managers or close them in ``finally``).

Threads and cores: the decoding thread runs PyAV/decord (which release the GIL while decoding) and the SAM2
resize (torch; the caller's thread keeps the model); the writer runs pycocotools, numpy and PyAV's H.264 encoder
(which release the GIL in their C loops). No CUDA work is done in these threads: moving tensors to the GPU and
reading results back stay in the caller's thread, so no CUDA stream or synchronisation crosses threads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["BackgroundConsumer", "BackgroundIterator"]

_ITEM, _END, _ERROR = "item", "end", "error"
_POLL_S = 0.05  # how often a blocked thread looks at the stop flag


class BackgroundIterator(Iterator):
    """Iterate ``iterable`` in a daemon thread, at most ``maxsize`` items ahead of the consumer.

    Args:
        iterable: consumed in the background thread only (a generator is also closed there, at the end or when
            :meth:`close` stops the thread early).
        maxsize: items produced but not consumed yet, at most (>= 1).
        name: the thread's name (shows in debuggers and ``threading.enumerate()``).

    Iterating yields the items in order; an exception raised by ``iterable`` is re-raised by ``next()`` (the
    same object), after which the thread is gone. :meth:`close` stops the thread early: it waits for the
    item being produced (e.g. one chunk being decoded), drops the items queued, and joins the thread.

    Raises:
        ValueError: ``maxsize`` < 1.
    """

    def __init__(self, iterable: Iterable, maxsize: int = 2, name: str = "refstream-prefetch"):
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, args=(iterable,), name=name, daemon=True)
        self._thread.start()

    def _run(self, iterable: Iterable) -> None:
        iterator = iter(iterable)
        try:
            for item in iterator:
                if not self._put((_ITEM, item)):
                    return
            self._put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer by __next__
            self._put((_ERROR, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def _put(self, message: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self._finished = True
        self._thread.join()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread (if still running) and join it; queued items are dropped. Idempotent."""
        self._finished = True
        self._stop.set()
        while self._thread.is_alive():
            self._drain()
            self._thread.join(_POLL_S)
        self._drain()

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def __enter__(self) -> "BackgroundIterator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class BackgroundConsumer:
    """Call ``handle(*args)`` for each :meth:`put` in a daemon thread, in order, at most ``maxsize`` calls behind.

    Args:
        handle: called in the background thread, once per item, in the order of :meth:`put`.
        maxsize: items put but not handled yet, at most (>= 1); :meth:`put` blocks while the queue is full.
        name: the thread's name.

    An exception raised by ``handle`` stops the thread (later items are dropped) and is re-raised, as the same
    object, by the next :meth:`put` or by :meth:`finish`. Call :meth:`finish` after the last item (it waits for
    every item to be handled) and :meth:`close` in ``finally`` (it stops the thread without waiting for the
    queued items when the caller failed).

    Raises:
        ValueError: ``maxsize`` < 1.
    """

    def __init__(self, handle: Callable[..., Any], maxsize: int = 4, name: str = "refstream-writer"):
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self._handle = handle
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                message = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if message is None or self._stop.is_set():
                return
            try:
                self._handle(*message)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller by put/finish
                self._error = exc
                return

    def put(self, *args: Any) -> None:
        """Queue one item (blocks while ``maxsize`` items wait).

        Raises:
            the exception ``handle`` raised on an earlier item; RuntimeError: the consumer is closed.
        """
        while True:
            self._raise_error()
            if self._stop.is_set() or not self._thread.is_alive():
                raise RuntimeError("this BackgroundConsumer is closed")
            try:
                self._queue.put(args, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait until every item put has been handled, then stop the thread.

        Raises:
            the exception ``handle`` raised, if any.
        """
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise_error()

    def close(self) -> None:
        """Stop the thread without handling what is still queued and join it (no error raised). Idempotent."""
        self._stop.set()
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "BackgroundConsumer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
