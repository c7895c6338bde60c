"""ForwardBatch.build_decode (the vectorised plain decode step) builds exactly what build does."""
from __future__ import annotations

import torch

from srt_entmtp.model.forward_batch import ForwardBatch


def test_build_decode_equals_build_for_one_token_per_request():
    g = torch.Generator().manual_seed(0)
    for lens in ([5], [3, 0, 17, 1], list(range(1, 40))):
        prefixes = [torch.randperm(1000, generator=g)[:n] for n in lens]
        new = torch.randperm(1000, generator=g)[:len(lens)] + 1000
        tokens = torch.randint(0, 50000, (len(lens),), generator=g).tolist()
        a = ForwardBatch.build_decode(tokens, prefixes, new)
        b = ForwardBatch.build([torch.tensor([t]) for t in tokens], prefixes, list(new.split(1)))
        for field in ("input_ids", "positions", "out_slots", "qo_indptr", "kv_indptr", "kv_indices"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert a.q_lens == b.q_lens and a.kv_lens == b.kv_lens and a.custom_mask is None


def test_build_decode_with_pending_slots_puts_each_between_its_prefix_and_its_new_slot():
    """A step launched while the one before is in flight: that step's slot is not yet in the
    prefix; build_decode(pending_slots=...) is build() over prefix + pending slot."""
    g = torch.Generator().manual_seed(1)
    for lens in ([0], [4, 0, 9], list(range(30))):
        prefixes = [torch.randperm(1000, generator=g)[:n] for n in lens]
        pending = torch.randperm(1000, generator=g)[:len(lens)] + 1000
        new = torch.randperm(1000, generator=g)[:len(lens)] + 2000
        tokens = [7] * len(lens)
        a = ForwardBatch.build_decode(tokens, prefixes, new, pending_slots=pending)
        b = ForwardBatch.build([torch.tensor([t]) for t in tokens], [torch.cat([p, s]) for p, s in
                                                                    zip(prefixes, pending.split(1))], list(new.split(1)))
        for field in ("input_ids", "positions", "out_slots", "qo_indptr", "kv_indptr", "kv_indices"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert a.kv_lens == b.kv_lens
