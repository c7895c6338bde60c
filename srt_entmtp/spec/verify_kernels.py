"""The verify graph's bookkeeping around its forward, as Triton kernels on CUDA (torch forms elsewhere).

Before the forward, `verify_inputs`: each request's prefix length, the forward's token ids and
positions, and the Triton tree attention's ancestor bits and hidden key range (13 small torch
ops; one kernel, one program per request).

After it, the tail: greedy acceptance of B placed trees, KV compaction, the next step's state.

After the verify forward, DeviceSpecStep needs per request: the deepest slot whose path agrees
with the target's argmax at every parent, the emitted tokens (accepted drafts, then the bonus),
the entropies along the path, the accepted path's K/V moved to the first slots of the request's
tree, and its last hidden state, root token and kept count written to the per-request pools.

`accept_torch` does this with ~50 small tensor ops over [B, S] (and ~10 passes over the float32
logits for the argmax and the entropies). Inside a CUDA graph each op is still a kernel of its
own: on the H200 the tail measured 0.14-0.17 ms of a 0.6-1.3 ms step
(scripts/time_step_graphs.py, a one-node-chain verify against a decode graph). On CUDA with
Triton, `accept` runs two kernels instead:

  * argmax_entropy: one pass over each row of the bf16 logits for its argmax (first index on a
    tie, as torch.argmax) and its entropy (online max / sum of exp / sum of exp * x, in float32);
    with SPLIT_ARGMAX, each row in chunks of ARGMAX_BLOCK columns, one program a chunk and no
    loop, whose partials accept_kernel combines (a program a row walked 24 blocks of 2,048 logits
    one after another: a chain of dependent loads, ~15 us at any batch);
  * accept_kernel: one program per (request, layer) finds the path from the layout table's rows
    (the mask is ancestor-or-self), copies that layer's accepted K and V, and the layer-0
    program writes the result row, the entropies, the hidden state, the root and the count.

Both agree with the torch form exactly on tokens and slots; the entropies differ by float32
summation order only. The CPU tests run the kernels in Triton's interpreter against
`accept_torch`.
"""
from __future__ import annotations

import functools
import os

import torch

from srt_entmtp.model import fused, pdl
from srt_entmtp.spec.entropy import entropy_from_logits
from srt_entmtp.spec.tree_layout import LayoutTable

__all__ = ["accept", "accept_torch", "accept_triton", "argmax_entropy", "triton_usable", "verify_inputs",
           "verify_inputs_torch", "verify_inputs_triton"]

ENABLED = True  # False: the torch form on the GPU too (benchmarks' A/B; read at capture)
# True: the argmax and entropy in chunks of ARGMAX_BLOCK columns (a program each), combined by
# accept_kernel; False: a program a row (argmax_entropy). A/B switch, read at capture.
SPLIT_ARGMAX = os.environ.get("ENTMTP_SPLIT_ARGMAX", "1") != "0"
ARGMAX_BLOCK = 4096  # 12 chunks of a 49,152-token vocabulary, 16 logits a thread at 8 warps


def triton_usable(x: torch.Tensor) -> bool:
    return ENABLED and not fused.DISABLED and x.is_cuda and _kernels() is not None


def verify_inputs(tokens, table: LayoutTable, row, req, known, ahead, kept, ids, pos, anc, skip) -> None:
    """The verify forward's inputs for B requests (shapes: see verify_inputs_torch)."""
    if anc is not None and triton_usable(kept):
        verify_inputs_triton(tokens, table, row, req, known, ahead, kept, ids, pos, anc, skip)
    else:
        verify_inputs_torch(tokens, table, row, req, known, ahead, kept, ids, pos, anc, skip)


def verify_inputs_torch(tokens, table: LayoutTable, row, req, known, ahead, kept, ids, pos, anc, skip) -> None:
    """tokens [B, S] drafted; row, req [B]; known [B] each request's prefix length as the host
    knows it; ahead [B] > 0 when the step was launched after one not yet read, whose kept slots
    (kept[req], written on the device) then extend the prefix. Writes ids, pos [B*S]; anc [B, S]
    the slots' ancestor bits (None: not wanted); skip [2, B] int32 the keys [prefix, known +
    ahead) hidden (that step's rejected slots; empty when ahead = 0)."""
    prefix = known + torch.where(ahead > 0, kept[req], 0)
    ids.copy_(tokens.view(-1))
    pos.copy_((prefix.unsqueeze(1) + table.depth[row]).view(-1))
    if anc is not None:
        anc.copy_(table.anc[row])
        skip[0].copy_(prefix)
        skip[1].copy_(known + ahead)


def verify_inputs_triton(tokens, table: LayoutTable, row, req, known, ahead, kept, ids, pos, anc, skip) -> None:
    """verify_inputs_torch in one kernel (anc not None: the Triton tree attention's inputs)."""
    triton, _, _, kern = _kernels()
    B, S = tokens.shape
    if B == 0:
        return
    assert anc is not None and table.anc is not None and tokens.is_contiguous() and skip.is_contiguous()
    use_pdl = pdl.on(kept)
    kern[(B,)](tokens, table.depth, table.anc, row, req, known, ahead, kept, ids, pos, anc, skip, skip.stride(0),
               S=S, SP=triton.next_power_of_2(S), PDL=use_pdl, num_warps=1, **pdl.launch_kw(use_pdl))


def accept(tokens, logits, hidden, table: LayoutTable, row, req, out_slots, kv, hidden_pool, roots, kept,
           result, entropy) -> None:
    """Greedy acceptance of B requests' placed trees (shapes: see accept_torch)."""
    if triton_usable(logits):
        accept_triton(tokens, logits, hidden, table, row, req, out_slots, kv, hidden_pool, roots, kept, result, entropy)
    else:
        accept_torch(tokens, logits, hidden, table, row, req, out_slots, kv, hidden_pool, roots, kept, result, entropy)


def accept_torch(tokens, logits, hidden, table: LayoutTable, row, req, out_slots, kv, hidden_pool, roots, kept,
                 result, entropy) -> None:
    """tokens [B, S] drafted (slot 0: the root); logits [B*S, V] and hidden [B*S, H] of the
    verify forward; row [B] each request's table row; req [B] its pool row; out_slots [B, S] its
    tree's KV slots; kv a KVPool; hidden_pool [R, H], roots [R], kept [R] the per-request pools;
    result [B, D+2] (accepted count, then D+1 emitted tokens, -1 pad) and entropy [B, D+1] outputs."""
    B, S = tokens.shape
    D = table.layout.depth
    dev = tokens.device
    par, depth, valid, mask = table.parent[row], table.depth[row], table.valid[row], table.mask[row]
    pred = logits.argmax(-1).view(B, S)
    # a node is right if its token is its parent's argmax; accepted if it and every ancestor are
    # right (mask rows are ancestor-or-self)
    ok = valid & (tokens == pred.gather(1, par))
    ok[:, 0] = True
    acc = (~mask | ok.unsqueeze(1)).all(-1)
    slot = torch.arange(S, device=dev)
    leaf = torch.where(acc, depth * (S + 1) + (S - slot), -1).argmax(1)  # deepest; first on a tie
    a = depth.gather(1, leaf.unsqueeze(1)).squeeze(1)
    on_path = mask[torch.arange(B, device=dev), leaf]                  # [B, S]
    d = torch.arange(D + 1, device=dev)
    sel = on_path.unsqueeze(1) & (depth.unsqueeze(1) == d.view(1, -1, 1))  # [B, D+1, S]
    path = torch.where(sel.any(-1), sel.to(torch.uint8).argmax(-1), leaf.unsqueeze(1))  # slot at depth d
    bonus = pred.gather(1, leaf.unsqueeze(1))
    drafted = torch.cat([tokens.gather(1, path[:, 1:]), bonus], 1)      # [B, D+1]
    emitted = torch.where(d < a.unsqueeze(1), drafted, torch.where(d == a.unsqueeze(1), bonus, -1))

    # the accepted path's KV moves to the first a+1 slots of the request's tree slots
    dst = out_slots[:, : D + 1]
    src = torch.where(d <= a.unsqueeze(1), out_slots.gather(1, path), dst)
    kv.copy_slots(src.reshape(-1), dst.reshape(-1))

    H = hidden.shape[-1]
    hidden_pool[req] = hidden.view(B, S, H)[torch.arange(B, device=dev), leaf]
    roots[req] = bonus.squeeze(1)  # the next step's root
    kept[req] = a + 1
    result[:, 0] = a
    result[:, 1:] = emitted
    entropy.copy_(entropy_from_logits(logits).view(B, S).gather(1, path))


@functools.cache
def _argmax_parts_kernel():
    import triton.language as tl
    from triton import jit

    @jit
    def argmax_parts_kernel(x_ptr, part_ptr, V, sx, s_part, CH, BLOCK_V: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # model/pdl.py
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # program (r, c): chunk c of row r, in one load: its max, the first index of it, and the sums
        # of exp(x - max) and exp(x - max) * (x - max) (what argmax_entropy_kernel's lanes keep)
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        col = c * BLOCK_V + tl.arange(0, BLOCK_V)
        x = tl.load(x_ptr + r * sx + col, mask=col < V, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        first = tl.min(tl.where(x == m, col, 2147483647), 0)
        seen = x > float("-inf")
        m_safe = tl.where(m > float("-inf"), m, 0.0)
        e = tl.where(seen, tl.exp(x - m_safe), 0.0)
        s = tl.sum(e, 0)
        t = tl.sum(e * tl.where(seen, x - m_safe, 0.0), 0)
        at = r * CH + c
        tl.store(part_ptr + at, m)
        tl.store(part_ptr + s_part + at, s)
        tl.store(part_ptr + 2 * s_part + at, t)
        tl.store(part_ptr.to(tl.pointer_type(tl.int32)) + 3 * s_part + at, first)

    return argmax_parts_kernel


def argmax_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax [R] int64, entropy in nats [R] float32) of each row of logits [R, V], one pass."""
    _, kern, _, _ = _kernels()
    R, V = logits.shape
    assert logits.stride(1) == 1
    pred = torch.empty(R, dtype=torch.long, device=logits.device)
    ent = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R:
        use_pdl = pdl.on(logits)
        kern[(R,)](logits, pred, ent, V, logits.stride(0), BLOCK_V=2048, PDL=use_pdl, num_warps=8,
                   **pdl.launch_kw(use_pdl))
    return pred, ent


def accept_triton(tokens, logits, hidden, table: LayoutTable, row, req, out_slots, kv, hidden_pool, roots, kept,
                  result, entropy) -> None:
    """accept_torch's work in two kernels (module docstring)."""
    triton, _, kern, _ = _kernels()
    B, S = tokens.shape
    D = table.layout.depth
    if B == 0:
        return
    R, V = logits.shape
    if SPLIT_ARGMAX:  # partials [4, R, CH]: max, sum of exp, sum of exp * x (float32), first index (int32)
        CH = triton.cdiv(V, ARGMAX_BLOCK)
        part = torch.empty(4, R, CH, dtype=torch.float32, device=logits.device)
        use_pdl = pdl.on(logits)
        _argmax_parts_kernel()[(R, CH)](logits, part, V, logits.stride(0), R * CH, CH, BLOCK_V=ARGMAX_BLOCK,
                                        PDL=use_pdl, num_warps=8, **pdl.launch_kw(use_pdl))
        pred, ent = part, part  # accept_kernel reads the partials
    else:
        CH = 0
        pred, ent = argmax_entropy(logits)
    k, v = kv.k, kv.v
    assert k.is_contiguous() and v.is_contiguous() and hidden.is_contiguous() and hidden_pool.is_contiguous()
    assert tokens.is_contiguous() and out_slots.is_contiguous() and result.stride(1) == 1 and entropy.stride(1) == 1
    row_elems = k.shape[2] * k.shape[3]
    use_pdl = pdl.on(logits)
    H = hidden.shape[-1]
    kern[(B, k.shape[0])](
        tokens, pred, ent, row, req, out_slots, table.parent, table.depth, table.valid.view(torch.uint8),
        table.mask.view(torch.uint8), hidden, hidden_pool, roots, kept, result, entropy, k, v,
        k.stride(0), H, result.stride(0), entropy.stride(0), R * max(CH, 1),
        S=S, D=D, CH=CH, CHP=triton.next_power_of_2(max(CH, 1)), SP=triton.next_power_of_2(S), DP=triton.next_power_of_2(D + 1), ROW=row_elems,
        ROWP=triton.next_power_of_2(row_elems), HP=triton.next_power_of_2(H), PDL=use_pdl, num_warps=4,
        **pdl.launch_kw(use_pdl))


@functools.cache
def _kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def argmax_entropy_kernel(x_ptr, pred_ptr, ent_ptr, V, sx, BLOCK_V: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # model/pdl.py
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # each lane keeps its own running max (and its first index), sum of exp(x - max) and sum of
        # exp(x - max) * (x - max); the lanes combine once at the end
        r = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, BLOCK_V)
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        t = tl.zeros([BLOCK_V], tl.float32)
        idx = tl.zeros([BLOCK_V], tl.int32)
        for v0 in range(0, V, BLOCK_V):
            col = v0 + lane
            x = tl.load(x_ptr + r * sx + col, mask=col < V, other=float("-inf")).to(tl.float32)
            seen = x > float("-inf")
            better = x > m                      # strictly: a lane keeps its first maximum
            idx = tl.where(better, col, idx)
            new_m = tl.maximum(m, x)
            had = m > float("-inf")
            scale = tl.where(had, tl.exp(m - new_m), 0.0)
            t = tl.where(had, scale * (t + (m - new_m) * s), 0.0)
            s = scale * s
            e = tl.where(seen, tl.exp(x - new_m), 0.0)
            t += e * tl.where(seen, x - new_m, 0.0)
            s += e
            m = new_m
        M = tl.max(m, 0)
        first = tl.min(tl.where(m == M, idx, 2147483647), 0)   # the first index of the row's maximum
        had = m > float("-inf")
        w = tl.where(had, tl.exp(m - M), 0.0)
        S_ = tl.sum(w * s, 0)
        T_ = tl.sum(tl.where(had, w * (t + (m - M) * s), 0.0), 0)
        tl.store(pred_ptr + r, first.to(tl.int64))
        tl.store(ent_ptr + r, tl.log(S_) - T_ / S_)

    @triton.jit
    def accept_kernel(tok_ptr, pred_ptr, ent_ptr, row_ptr, req_ptr, oslot_ptr, par_ptr, depth_ptr, valid_ptr,
                      mask_ptr, hid_ptr, hpool_ptr, roots_ptr, kept_ptr, res_ptr, eout_ptr, k_ptr, v_ptr,
                      layer_stride, H, s_res, s_ent, s_part,
                      S: tl.constexpr, D: tl.constexpr, CH: tl.constexpr, CHP: tl.constexpr, SP: tl.constexpr,
                      DP: tl.constexpr, ROW: tl.constexpr, ROWP: tl.constexpr, HP: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # model/pdl.py
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0)
        layer = tl.program_id(1)
        sl = tl.arange(0, SP)
        in_s = sl < S
        trow = tl.load(row_ptr + b)
        par = tl.load(par_ptr + trow * S + sl, mask=in_s, other=0)
        dep = tl.load(depth_ptr + trow * S + sl, mask=in_s, other=0)
        val = tl.load(valid_ptr + trow * S + sl, mask=in_s, other=0) != 0
        tok = tl.load(tok_ptr + b * S + sl, mask=in_s, other=-1)
        if CH:  # pred_ptr holds argmax_parts' partials: combine each slot's chunks, then pick by slot in registers
            c = tl.arange(0, CHP)
            pm = in_s[:, None] & (c < CH)[None, :]
            at = (b * S + sl)[:, None] * CH + c[None, :]
            m = tl.load(pred_ptr + at, mask=pm, other=float("-inf"))
            ps = tl.load(pred_ptr + s_part + at, mask=pm, other=0.0)
            pt = tl.load(pred_ptr + 2 * s_part + at, mask=pm, other=0.0)
            pi = tl.load(pred_ptr.to(tl.pointer_type(tl.int32)) + 3 * s_part + at, mask=pm, other=2147483647)
            M = tl.max(m, 1)
            first = tl.min(tl.where(m == M[:, None], pi, 2147483647), 1)   # the first index of the slot's maximum
            had = m > float("-inf")
            wgt = tl.where(had, tl.exp(m - M[:, None]), 0.0)
            S_ = tl.sum(wgt * ps, 1)
            T_ = tl.sum(tl.where(had, wgt * (pt + (m - M[:, None]) * ps), 0.0), 1)
            S_ = tl.where(in_s, S_, 1.0)  # slots past S: nothing to combine
            pred_s = first.to(tl.int64)
            ent_s = tl.log(S_) - T_ / S_
            want = tl.sum(tl.where(par[:, None] == sl[None, :], pred_s[None, :], 0), 1)
            want = tl.where(in_s, want, -2)
        else:
            want = tl.load(pred_ptr + b * S + par, mask=in_s, other=-2)
        ok = (val & (tok == want)) | (sl == 0)
        anc = tl.load(mask_ptr + trow * S * S + sl[:, None] * S + sl[None, :],
                      mask=in_s[:, None] & in_s[None, :], other=0) != 0
        bad = tl.max(tl.where(anc & ~ok[None, :], 1, 0), 1)    # [SP] a wrong node among ancestor-or-self
        acc = (bad == 0) & in_s
        score = tl.where(acc, dep * (S + 1) + (S - sl), -1)
        best = tl.max(score, 0)
        leaf = tl.min(tl.where(score == best, sl, SP), 0)      # the scores are distinct; the slot of the best
        a = tl.sum(tl.where(sl == leaf, dep, 0), 0)
        on_path = tl.load(mask_ptr + trow * S * S + leaf * S + sl, mask=in_s, other=0) != 0
        d = tl.arange(0, DP)
        sel = on_path[None, :] & (dep[None, :] == d[:, None]) & in_s[None, :]   # [DP, SP]
        path = tl.where(tl.max(sel.to(tl.int32), 1) > 0, tl.sum(tl.where(sel, sl[None, :], 0), 1), leaf)
        d_ok = d <= D
        src = tl.load(oslot_ptr + b * S + path, mask=d_ok, other=0)
        dst = tl.load(oslot_ptr + b * S + d, mask=d_ok, other=0)
        move = d_ok & (d <= a) & (src != dst)
        # this program's layer: read every moved row before writing any (a path slot can be the
        # destination of a shallower one)
        c = tl.arange(0, ROWP)
        cm = move[:, None] & (c < ROW)[None, :]
        base = layer.to(tl.int64) * layer_stride
        ks = tl.load(k_ptr + base + src[:, None] * ROW + c[None, :], mask=cm, other=0.0)
        vs = tl.load(v_ptr + base + src[:, None] * ROW + c[None, :], mask=cm, other=0.0)
        tl.debug_barrier()
        tl.store(k_ptr + base + dst[:, None] * ROW + c[None, :], ks, mask=cm)
        tl.store(v_ptr + base + dst[:, None] * ROW + c[None, :], vs, mask=cm)
        if layer == 0:
            if CH:
                bonus = tl.sum(tl.where(sl == leaf, pred_s, 0), 0)
            else:
                bonus = tl.load(pred_ptr + b * S + leaf)
            sel1 = on_path[None, :] & (dep[None, :] == d[:, None] + 1) & in_s[None, :]   # the slot at depth d + 1
            nxt = tl.sum(tl.where(sel1, sl[None, :], 0), 1)
            drafted = tl.load(tok_ptr + b * S + nxt, mask=d < a, other=-1)
            emitted = tl.where(d < a, drafted, tl.where(d == a, bonus, -1))
            tl.store(res_ptr + b * s_res, a.to(tl.int64))
            tl.store(res_ptr + b * s_res + 1 + d, emitted, mask=d_ok)
            if CH:
                e_path = tl.sum(tl.where(path[:, None] == sl[None, :], ent_s[None, :], 0.0), 1)
            else:
                e_path = tl.load(ent_ptr + b * S + path, mask=d_ok, other=0.0)
            tl.store(eout_ptr + b * s_ent + d, e_path, mask=d_ok)
            r = tl.load(req_ptr + b)
            tl.store(roots_ptr + r, bonus)
            tl.store(kept_ptr + r, (a + 1).to(tl.int64))
            hc = tl.arange(0, HP)
            hv = tl.load(hid_ptr + (b * S + leaf).to(tl.int64) * H + hc, mask=hc < H, other=0.0)
            tl.store(hpool_ptr + r * H + hc, hv, mask=hc < H)

    @triton.jit
    def verify_inputs_kernel(tok_ptr, depth_ptr, anc_tab_ptr, row_ptr, req_ptr, known_ptr, ahead_ptr, kept_ptr,
                             ids_ptr, pos_ptr, anc_ptr, skip_ptr, s_skip,
                             S: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # model/pdl.py
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0)
        sl = tl.arange(0, SP)
        m = sl < S
        trow = tl.load(row_ptr + b)
        known = tl.load(known_ptr + b)
        ahead = tl.load(ahead_ptr + b)
        kept = tl.load(kept_ptr + tl.load(req_ptr + b))
        prefix = known + tl.where(ahead > 0, kept, 0)
        tl.store(ids_ptr + b * S + sl, tl.load(tok_ptr + b * S + sl, mask=m), mask=m)
        tl.store(pos_ptr + b * S + sl, prefix + tl.load(depth_ptr + trow * S + sl, mask=m), mask=m)
        tl.store(anc_ptr + b * S + sl, tl.load(anc_tab_ptr + trow * S + sl, mask=m), mask=m)
        tl.store(skip_ptr + b, prefix.to(tl.int32))
        tl.store(skip_ptr + s_skip + b, (known + ahead).to(tl.int32))

    return triton, argmax_entropy_kernel, accept_kernel, verify_inputs_kernel
