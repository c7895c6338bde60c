"""Pinned host buffers whose uploads are queued without a sync, fenced by events.

A step's inputs go up from pinned host memory with non-blocking copies, so the host may write
the buffer again only once the copy that read it has run on the device. Where steps are
launched ahead of the ones before them being read, counting turns does not bound that: a copy
is fenced by an event recorded after it, and the host waits on the event (almost always
already passed) before rewriting the buffer. Without CUDA, copies are synchronous and there is
nothing to fence.
"""
from __future__ import annotations

import torch


def current_stream() -> torch.cuda.Stream:
    """torch.cuda.current_stream(), without the device lookup it does when given no device (its
    availability checks and an environment read: ~10 us of Python, three times a speculative
    step, for Event.record() with no stream)."""
    return torch.cuda.current_stream(torch.cuda.current_device())


def record(event: torch.cuda.Event) -> None:
    """event.record() on the current stream (see current_stream)."""
    event.record(current_stream())


class CopyFence:
    """The copies that last read one pinned buffer: mark() after queueing them, wait() before
    writing the buffer again; or `with fence:` around the writes and the copies."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._event = None

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def mark(self) -> None:
        if self.enabled:
            self._event = self._event or torch.cuda.Event()
            record(self._event)

    def __enter__(self) -> None:
        self.wait()

    def __exit__(self, *exc) -> None:
        self.mark()


class StagingRing:
    """Host twins of one device buffer, written and sent up in turn: pinned and each fenced for a
    CUDA buffer, plain (the copy is synchronous) for a CPU one. pinned: whether to pin and fence
    (default: whether dev_buf is on CUDA)."""

    def __init__(self, dev_buf: torch.Tensor, n: int, pinned: bool | None = None):
        self.dev_buf = dev_buf
        self.pinned = dev_buf.is_cuda if pinned is None else pinned
        self.bufs = [torch.zeros_like(dev_buf, device="cpu") for _ in range(n)]
        if self.pinned:
            self.bufs = [b.pin_memory() for b in self.bufs]
        self.fences = [CopyFence(self.pinned) for _ in range(n)]
        self.turn = 0

    def take(self) -> torch.Tensor:
        """The next twin, free to write (waits, rarely, for the copy that last read it)."""
        self.fences[self.turn].wait()
        return self.bufs[self.turn]

    def send(self) -> None:
        """Queue the copy of the twin just written to the device buffer, and fence it."""
        self.dev_buf.copy_(self.bufs[self.turn], non_blocking=self.pinned)
        self.fences[self.turn].mark()
        self.turn = (self.turn + 1) % len(self.bufs)
