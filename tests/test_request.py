"""Request's KV slot list: a growable host array behind a LongTensor view (sched/request.py)."""
import numpy as np
import torch

from srt_entmtp.sched.request import Request, SamplingParams


def test_kv_slots_append_grows_and_keeps_earlier_views():
    r = Request([1, 2, 3], SamplingParams())
    assert r.num_kv == 0 and r.kv_slots.numel() == 0 and r.kv_slots.dtype == torch.long
    r.append_kv(torch.tensor([5, 6, 7]))
    before = r.kv_slots
    for k in range(100):  # past the first capacity: the buffer is reallocated on the way
        r.append_kv(np.array([100 + k], dtype=np.int64))
    assert r.num_kv == 103
    assert before.tolist() == [5, 6, 7]  # a view taken before the appends still reads its slots
    assert r.kv_slots.tolist() == [5, 6, 7] + list(range(100, 200))
    assert np.array_equal(r.kv_array, r.kv_slots.numpy())


def test_kv_slots_setter_copies_and_resets():
    r = Request([1], SamplingParams())
    r.append_kv(torch.arange(10))
    src = torch.tensor([3, 4])
    r.kv_slots = src
    src[0] = 99  # the request holds its own copy
    assert r.kv_slots.tolist() == [3, 4] and r.num_kv == 2
    r.append_kv(torch.tensor([8]))
    assert r.kv_slots.tolist() == [3, 4, 8]
    r.kv_slots = torch.empty(0, dtype=torch.long)
    assert r.num_kv == 0 and r.kv_slots.tolist() == []
