"""The FlashInfer backend's mask layout, checked on CPU (the kernels themselves run in tests/gpu)."""
import torch

from srt_entmtp.model.attention.flashinfer import full_kv_mask
from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.spec.drafters.bench import bench_tree
from srt_entmtp.spec.ragged import RaggedTreeBatch


def test_full_kv_mask_equals_ragged_tree_layout():
    trees = [bench_tree(n) for n in (1, 7, 3, 20)]
    prefixes = [5, 0, 33, 2]
    fb = ForwardBatch.build([torch.zeros(t.num_nodes, dtype=torch.long) for t in trees],
                            [torch.arange(1, p + 1) for p in prefixes],
                            [torch.arange(100, 100 + t.num_nodes) for t in trees],
                            custom_masks=[t.mask for t in trees])
    expect = RaggedTreeBatch.build(trees, torch.tensor(prefixes)).flashinfer_mask()
    assert torch.equal(full_kv_mask(fb), expect)


def test_full_kv_mask_causal_rows_for_requests_without_a_tree():
    fb = ForwardBatch.build([torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long)],
                            [torch.arange(1, 3), torch.arange(3, 4)], [torch.arange(10, 13), torch.arange(20, 22)],
                            custom_masks=[None, torch.tensor([[True, False], [True, True]])])
    m = full_kv_mask(fb)
    first = m[:15].view(3, 5)   # prefix 2 + causal over 3 new tokens
    assert torch.equal(first, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert torch.equal(m[15:].view(2, 3), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
