#!/usr/bin/env python3
"""Tree-verify attention on the GPU: one masked kernel over prefix + tree, against a cascade.

    masked:  FlashInfer's paged prefill with a custom mask over each request's prefix + tree
             keys (the mask covers every prefix column too, all ones);
    cascade: the same prefill without a mask over the prefix keys only, a masked one over the
             tree's own keys, and FlashInfer's merge of the two by log-sum-exp;
    triton:  the engine's verify-graph kernel (model/attention/tree_triton.py): one pass over
             prefix + tree keys with one int64 of ancestor bits per node, split over the keys
             and merged where a small batch would leave the GPU idle.

Both run for the model's attention shapes (SmolLM2-135M: 9 query heads, 3 KV heads, head dim
64, bfloat16) in CUDA graph mode (FlashInfer's wrappers in their graph mode), 30 calls to a graph as in one forward's 30 layers, so the
time per call is what a layer pays inside the verify graph. Random ancestor-or-self masks;
the two outputs are compared as a check. Needs FlashInfer, Triton and a CUDA device, not the model:

    python scripts/bench_tree_attention.py [--prefix 512] [--out tree_attention.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srt_entmtp.model.attention.tree_triton import ancestor_bits, num_splits, tree_attention

H, KH, D = 9, 3, 64
LAYERS = 30


def tree_masks(B: int, S: int, g: torch.Generator) -> torch.Tensor:
    """[B, S, S] ancestor-or-self masks of random trees (node i's parent is a random j < i)."""
    m = torch.zeros(B, S, S, dtype=torch.bool)
    for b in range(B):
        for i in range(S):
            if i:
                p = int(torch.randint(0, i, (1,), generator=g))
                m[b, i] = m[b, p]
            m[b, i, i] = True
    return m


def packed(bits: torch.Tensor, per_req: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit-pack each request's flat mask on its own byte boundary (FlashInfer's layout)."""
    out, ind = [], [0]
    a = 0
    for n in per_req:
        seg = bits[a:a + n]
        pad = (-n) % 8
        seg = torch.cat([seg, torch.zeros(pad, dtype=torch.bool)]).view(-1, 8).long()
        out.append((seg << torch.arange(8)).sum(1).to(torch.uint8))
        ind.append(ind[-1] + out[-1].numel())
        a += n
    return torch.cat(out), torch.tensor(ind, dtype=torch.int32)


def graph_us(fn) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(LAYERS):
            fn()
    ts = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / LAYERS)
    return statistics.median(ts)


def one(B: int, S: int, prefix: int, g: torch.Generator, sweep: list[int]) -> dict:
    import flashinfer
    from flashinfer.cascade import merge_state_in_place

    dev = "cuda"
    i32 = {"dtype": torch.int32, "device": dev}
    slots = B * (prefix + S) + 1
    kc = torch.randn(slots, 1, KH, D, dtype=torch.bfloat16, device=dev)
    vc = torch.randn(slots, 1, KH, D, dtype=torch.bfloat16, device=dev)
    q = torch.randn(B * S, H, D, dtype=torch.bfloat16, device=dev)
    perm = torch.randperm(slots - 1, generator=g)[: B * (prefix + S)] + 1
    pre_idx = [perm[b * (prefix + S): b * (prefix + S) + prefix] for b in range(B)]
    tree_idx = [perm[b * (prefix + S) + prefix: (b + 1) * (prefix + S)] for b in range(B)]
    tm = tree_masks(B, S, g)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    qo = torch.arange(0, (B + 1) * S, S, dtype=torch.int32)
    ones = torch.ones(B, dtype=torch.int32)
    common = {"num_qo_heads": H, "num_kv_heads": KH, "head_dim_qk": D, "page_size": 1, "q_data_type": torch.bfloat16,
                  "kv_data_type": torch.bfloat16}

    def wrapper(kv_len: int, masked: bool, mask_bytes: int = 0):
        bufs = {"qo_indptr_buf": torch.zeros(B + 1, **i32), "paged_kv_indptr_buf": torch.zeros(B + 1, **i32),
                    "paged_kv_indices_buf": torch.zeros(B * kv_len, **i32),
                    "paged_kv_last_page_len_buf": torch.zeros(B, **i32)}
        if masked:
            bufs |= {"custom_mask_buf": torch.zeros(mask_bytes, dtype=torch.uint8, device=dev),
                         "mask_indptr_buf": torch.zeros(B + 1, **i32)}
        return flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", use_cuda_graph=True, backend="fa2", **bufs)

    # one masked kernel over prefix + tree
    full_bits = torch.cat([torch.cat([torch.ones(S, prefix, dtype=torch.bool), tm[b]], 1).reshape(-1) for b in range(B)])
    pk, _pind = packed(full_bits, [S * (prefix + S)] * B)
    w_full = wrapper(prefix + S, True, pk.numel())
    idx_full = torch.cat([torch.cat([pre_idx[b], tree_idx[b]]) for b in range(B)]).to(torch.int32)
    # FlashInfer packs a custom mask on the device: the mask and its indptrs go there
    w_full.plan(qo.to(dev), torch.arange(0, (B + 1) * (prefix + S), prefix + S, **i32), idx_full.to(dev),
                ones.to(dev), custom_mask=full_bits.to(dev), **common)

    # cascade: unmasked prefix, masked tree, merged
    w_pre = wrapper(prefix, False)
    w_pre.plan(qo, torch.arange(0, (B + 1) * prefix, prefix, dtype=torch.int32),
               torch.cat(pre_idx).to(torch.int32), ones, causal=False, **common)
    tk, _ = packed(tm.reshape(-1), [S * S] * B)
    w_tree = wrapper(S, True, tk.numel())
    w_tree.plan(qo.to(dev), qo.to(dev), torch.cat(tree_idx).to(**i32), ones.to(dev), custom_mask=tm.reshape(-1).to(dev),
                **common)
    o, lse = torch.empty_like(q), torch.empty(B * S, H, dtype=torch.float32, device=dev)
    o2, lse2 = torch.empty_like(q), torch.empty_like(lse)
    out_full = torch.empty_like(q)

    def run_full():
        w_full.run(q, (kc, vc), out=out_full)

    def run_cascade():
        w_pre.run(q, (kc, vc), out=o, lse=lse, return_lse=True)
        w_tree.run(q, (kc, vc), out=o2, lse=lse2, return_lse=True)
        merge_state_in_place(o, lse, o2, lse2)

    def run_parts(part):
        return {"prefix": lambda: w_pre.run(q, (kc, vc), out=o, lse=lse, return_lse=True),
                "tree": lambda: w_tree.run(q, (kc, vc), out=o2, lse=lse2, return_lse=True),
                "merge": lambda: merge_state_in_place(o2, lse2, o2, lse2)}[part]

    # the engine's kernel (model/attention/tree_triton.py): ancestor bits instead of a packed mask
    kv_indptr = torch.arange(0, (B + 1) * (prefix + S), prefix + S, **i32)
    anc = ancestor_bits(tm).to(dev)
    blk = max(16, min(64, 1 << (S * H // KH - 1).bit_length()))
    ns = num_splits(B, S, H, KH, blk)
    part_o = torch.empty(ns, B * S, H, D, dtype=torch.float32, device=dev)
    part_lse = torch.empty(ns, B * S, H, dtype=torch.float32, device=dev)
    out_tri = torch.empty_like(q)
    kc3, vc3, idx_dev = kc.squeeze(1), vc.squeeze(1), idx_full.to(dev)

    def run_triton():
        tree_attention(q, kc3, vc3, kv_indptr, idx_dev, anc, out_tri, part_o, part_lse, D ** -0.5, S, ns, blk)

    run_full()
    run_cascade()
    run_triton()
    torch.cuda.synchronize()
    err = (out_full.float() - o.float()).abs().max().item()
    row = {"batch": B, "tree_tokens": S, "prefix": prefix, "masked_us": graph_us(run_full),
           "cascade_us": graph_us(run_cascade), "triton_us": graph_us(run_triton), "triton_splits": ns,
           "max_abs_diff": err, "triton_max_abs_diff": (out_full.float() - out_tri.float()).abs().max().item()}
    for p in ("prefix", "tree", "merge"):
        row[f"{p}_us"] = graph_us(run_parts(p))
    if sweep:  # the kernel at other key-split counts than num_splits picks
        by = {}
        for k in sweep:
            po = torch.empty(k, B * S, H, D, dtype=torch.float32, device=dev)
            pl = torch.empty(k, B * S, H, dtype=torch.float32, device=dev)
            by[k] = graph_us(lambda k=k, po=po, pl=pl: tree_attention(q, kc3, vc3, kv_indptr, idx_dev, anc, out_tri,
                                                                       po, pl, D ** -0.5, S, k, blk))
        row["triton_us_by_splits"] = by
    return row


def decode_row(B: int, prefix: int, g: torch.Generator) -> dict:
    """One query token per request (a plain decode step): FlashInfer's decode wrapper on tensor
    cores (what the engine uses for this GQA model) against its CUDA-core kernel."""
    import flashinfer

    dev = "cuda"
    i32 = {"dtype": torch.int32, "device": dev}
    slots = B * prefix + 1
    kc = torch.randn(slots, 1, KH, D, dtype=torch.bfloat16, device=dev)
    vc = torch.randn(slots, 1, KH, D, dtype=torch.bfloat16, device=dev)
    q = torch.randn(B, H, D, dtype=torch.bfloat16, device=dev)
    idx = (torch.randperm(slots - 1, generator=g)[: B * prefix] + 1).to(torch.int32)
    indptr = torch.arange(0, (B + 1) * prefix, prefix, dtype=torch.int32)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    row = {"batch": B, "prefix": prefix}
    outs = {}
    for tc in (True, False):
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            ws, "NHD", use_cuda_graph=True, use_tensor_cores=tc, paged_kv_indptr_buffer=torch.zeros(B + 1, **i32),
            paged_kv_indices_buffer=torch.zeros(B * prefix, **i32), paged_kv_last_page_len_buffer=torch.zeros(B, **i32))
        w.plan(indptr, idx, torch.ones(B, dtype=torch.int32), H, KH, D, 1, q_data_type=torch.bfloat16,
               kv_data_type=torch.bfloat16)
        out = torch.empty_like(q)
        outs[tc] = out
        row["tensor_cores_us" if tc else "cuda_cores_us"] = graph_us(lambda w=w, out=out: w.run(q, (kc, vc), out=out))
    row["max_abs_diff"] = (outs[True].float() - outs[False].float()).abs().max().item()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=int, nargs="+", default=[512])
    ap.add_argument("--shapes", default="1x8,1x16,1x33,8x4,8x8,8x16,64x2,64x4,64x8",
                    help="requests x tree tokens, comma-separated")
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                    help="also time the Triton kernel at these key-split counts (batches up to 8)")
    ap.add_argument("--out", default=None)
    ns = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_tree_attention.py needs a CUDA device and FlashInfer")
    g = torch.Generator().manual_seed(0)
    rows = []
    for prefix in ns.prefix:
        for shape in ns.shapes.split(","):
            B, S = map(int, shape.split("x"))
            rows.append(one(B, S, prefix, g, ns.splits if B <= 8 else []))
    gpu = torch.cuda.get_device_name()
    print(f"\ntree attention per layer call, in CUDA graphs, {gpu} (us)")
    print(f"{'B':>3} {'S':>3} {'prefix':>6} {'masked':>8} {'cascade':>8} {'prefix':>8} {'tree':>6} {'merge':>6} "
          f"{'triton':>7} {'splits':>6} {'masked/triton':>13} {'cascade diff':>12} {'triton diff':>11}")
    for r in rows:
        print(f"{r['batch']:>3} {r['tree_tokens']:>3} {r['prefix']:>6} {r['masked_us']:>8.2f} {r['cascade_us']:>8.2f} "
              f"{r['prefix_us']:>8.2f} {r['tree_us']:>6.2f} {r['merge_us']:>6.2f} {r['triton_us']:>7.2f} "
              f"{r['triton_splits']:>6} {r['masked_us'] / r['triton_us']:>12.2f}x {r['max_abs_diff']:>12.4f} "
              f"{r['triton_max_abs_diff']:>11.4f}")
    if any("triton_us_by_splits" in r for r in rows):
        print("\nTriton tree kernel by key splits (us; * = num_splits' pick)")
        for r in rows:
            if "triton_us_by_splits" in r:
                cells = "  ".join(f"{k}:{v:.2f}{'*' if k == r['triton_splits'] else ''}"
                                  for k, v in r["triton_us_by_splits"].items())
                print(f"{r['batch']:>3} {r['tree_tokens']:>3} {r['prefix']:>6}   {cells}")
    dec = [decode_row(B, p, g) for p in ns.prefix for B in (1, 8, 64)]
    print(f"\ndecode attention per layer call, in CUDA graphs, {gpu} (us)")
    print(f"{'B':>3} {'prefix':>6} {'tensor cores':>12} {'CUDA cores':>10} {'max|diff|':>9}")
    for r in dec:
        print(f"{r['batch']:>3} {r['prefix']:>6} {r['tensor_cores_us']:>12.2f} {r['cuda_cores_us']:>10.2f} "
              f"{r['max_abs_diff']:>9.4f}")
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump({"gpu": gpu, "layers_per_graph": LAYERS, "rows": rows, "decode": dec}, f, indent=1)


if __name__ == "__main__":
    main()
