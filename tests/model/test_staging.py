"""Pinned upload buffers fenced by events (model/staging.py), with stand-ins for CUDA events and
pinned memory (no CUDA here): a buffer is written again only after the event recorded behind
the copy that last read it has been waited on, however many launches came between."""
from __future__ import annotations

import torch

from srt_entmtp.model import staging


class _Events:
    """torch.cuda.Event stand-in that logs creation, record and wait, in order."""

    def __init__(self):
        self.log = []
        parent = self

        class Event:
            def __init__(self):
                self.id = sum(1 for x in parent.log if x[0] == "new")
                parent.log.append(("new", self.id))

            def record(self, stream=None):
                parent.log.append(("record", self.id))

            def synchronize(self):
                parent.log.append(("wait", self.id))

        self.Event = Event

    def waits_follow_records(self) -> bool:
        return all(("record", x[1]) in self.log[:i] for i, x in enumerate(self.log) if x[0] == "wait")


def test_staging_ring_rewrites_a_twin_only_after_its_copy_ran_mocked_cuda_events(monkeypatch):
    ev = _Events()
    monkeypatch.setattr(torch.cuda, "Event", ev.Event)
    monkeypatch.setattr(staging, "current_stream", lambda: None)  # no CUDA stream here
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    dev = torch.zeros(4, dtype=torch.long)
    ring = staging.StagingRing(dev, 2, pinned=True)  # as for a CUDA buffer
    for k in range(5):
        host = ring.take()
        host.fill_(k)
        ring.send()
        assert dev.tolist() == [k] * 4  # the copy took what was written
        assert host is ring.bufs[k % 2]
    assert [x for x in ev.log if x[0] == "new"] == [("new", 0), ("new", 1)]  # one event per twin, reused
    # each twin's second and later hand-outs wait for its own last copy, and only then
    assert [x[1] for x in ev.log if x[0] == "wait"] == [0, 1, 0]
    assert ev.waits_follow_records()


def test_copy_fence_waits_on_the_last_mark_and_is_off_without_cuda(monkeypatch):
    ev = _Events()
    monkeypatch.setattr(torch.cuda, "Event", ev.Event)
    monkeypatch.setattr(staging, "current_stream", lambda: None)  # no CUDA stream here
    fence = staging.CopyFence(True)
    fence.wait()  # nothing queued yet: nothing to wait for
    assert ev.log == []
    fence.mark()
    fence.wait()
    fence.mark()
    fence.wait()
    assert ev.log == [("new", 0), ("record", 0), ("wait", 0), ("record", 0), ("wait", 0)]
    off = staging.CopyFence(False)  # CPU: copies are synchronous
    off.mark()
    off.wait()
    assert len(ev.log) == 5
    with fence:  # around the writes and their copies: waits on entry, marks on exit
        pass
    assert ev.log[5:] == [("wait", 0), ("record", 0)]
