"""Verification of drafted trees against the target model's logits, over a ragged batch.

Inputs are flat over the batch's nodes (RaggedTreeBatch order): `node_tokens[j]` is node j's
drafted token (a root's token is the last accepted token, already known to be right) and
`target_logits[j]` are the target's logits at node j, i.e. its prediction of what follows j.

Greedy: accept the deepest node whose whole path agrees with the argmax of each parent.
Sampling: tree rejection sampling for deterministic (point-mass) draft candidates. At the current
node, with residual p = the filtered target distribution, the children are tried in canonical
order; child x is accepted with probability p(x) / sum(p), and a rejected x is removed from p.
If a child is accepted we descend; otherwise the bonus token is drawn from the normalised
residual. Each emitted token is then distributed exactly as the target's: the i-th child is
accepted with probability (1 - m_i) * p(x_i) / (1 - m_i) = p(x_i), m_i the mass of the children
tried before it, and the bonus covers the untried rest with (1 - m) * p(y) / (1 - m) = p(y).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from srt_entmtp.spec.ragged import RaggedTreeBatch
from srt_entmtp.spec.sampling import apply_sampling_filters, sample_from

__all__ = ["VerifyResult", "apply_sampling_filters", "greedy_verify", "sample_verify"]


@dataclass
class VerifyResult:
    accept_len: torch.Tensor       # [B] accepted non-root nodes
    accepted_nodes: torch.Tensor   # [B, max_depth+1] local node ids root..last accepted, -1 pad
    accepted_flat: torch.Tensor    # [sum(accept_len+1)] flat batch ids of accepted nodes (root incl.)
    accepted_indptr: torch.Tensor  # [B+1]
    bonus_tokens: torch.Tensor     # [B] target's token after the last accepted node
    emitted_tokens: torch.Tensor   # [B, max_depth+1] accepted non-root tokens then bonus, -1 pad

    @property
    def accepted_tokens(self) -> list[list[int]]:
        """Host copy of the emitted tokens per request (accepted drafts + bonus)."""
        rows = self.emitted_tokens.tolist()
        lens = (self.accept_len + 1).tolist()
        return [r[:n] for r, n in zip(rows, lens)]


def _finish(batch: RaggedTreeBatch, nodes: torch.Tensor, bonus: torch.Tensor, node_tokens: torch.Tensor) -> VerifyResult:
    """Everything else follows from the accepted path (local ids, -1 padded) and the bonus."""
    valid = nodes >= 0
    accept_len = valid.sum(dim=1) - 1
    flat = nodes + batch.node_indptr[:-1].unsqueeze(1)
    indptr = torch.zeros(batch.batch_size + 1, dtype=torch.long, device=nodes.device)
    indptr[1:] = (accept_len + 1).cumsum(0)
    drafted = torch.where(valid[:, 1:], node_tokens[flat[:, 1:].clamp(min=0)], -1)
    emitted = torch.cat([drafted, drafted.new_full((drafted.shape[0], 1), -1)], dim=1)
    emitted.scatter_(1, accept_len.unsqueeze(1), bonus.unsqueeze(1))
    return VerifyResult(accept_len=accept_len, accepted_nodes=nodes, accepted_flat=flat[valid],
                        accepted_indptr=indptr, bonus_tokens=bonus, emitted_tokens=emitted)


def _greedy_path(batch: RaggedTreeBatch, node_tokens: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted local ids [B, max_depth+1], flat id of the last accepted node [B])."""
    parents = batch.parents_global
    ok = (node_tokens == pred[parents.clamp(min=0)]) | (parents < 0)
    anc = batch.tree_mask_padded()                                  # [B, n, n]
    real = batch.padded(torch.ones_like(ok), False)                 # [B, n]
    accepted = (~anc | batch.padded(ok, False).unsqueeze(1)).all(dim=2) & real
    n = batch.max_nodes
    local = torch.arange(n, device=ok.device)
    depth = batch.padded(batch.depths, 0)
    # deepest accepted node; among equally deep ones (duplicate sibling drafts) the first
    score = torch.where(accepted, depth * (n + 1) + (n - local), -1)
    best = score.argmax(dim=1)
    on_path = anc[torch.arange(batch.batch_size, device=ok.device), best]   # [B, n]
    D = batch.max_depth
    col = torch.where(on_path, depth, D + 1)
    nodes = torch.full((batch.batch_size, D + 2), -1, dtype=torch.long, device=ok.device)
    nodes.scatter_(1, col, local.expand_as(col).clone())
    return nodes[:, : D + 1], best + batch.node_indptr[:-1]


def greedy_verify(batch: RaggedTreeBatch, node_tokens: torch.Tensor, target_logits: torch.Tensor) -> VerifyResult:
    """Longest path whose tokens are each the argmax of their parent's logits.

    The argmax runs where the logits are; the walk down each tree runs on the host, over one
    copy of T drafted and T predicted tokens. The engine needs the emitted tokens on the host
    anyway, and a tree is a few dozen nodes, so this replaces ~40 small device ops (each a
    kernel launch on a GPU) with one transfer and a few microseconds of Python per request."""
    dev = target_logits.device
    pred = target_logits.argmax(dim=-1)
    both = torch.stack([node_tokens.to(pred.dtype), pred]).cpu().tolist()  # the step's one sync
    toks, prd = both
    starts = batch.node_indptr.tolist()
    D = batch.max_depth
    nodes = torch.full((batch.batch_size, D + 1), -1, dtype=torch.long)
    flat, lens, bonus, emitted = [], [], [], torch.full((batch.batch_size, D + 1), -1, dtype=torch.long)
    for i, tree in enumerate(batch.trees):
        path = _deepest_accepted(tree.child_lists, toks, prd, starts[i])
        nodes[i, : len(path)] = torch.tensor(path)
        flat += [starts[i] + j for j in path]
        lens.append(len(path) - 1)
        b = prd[starts[i] + path[-1]]
        bonus.append(b)
        row = [toks[starts[i] + j] for j in path[1:]] + [b]
        emitted[i, : len(row)] = torch.tensor(row)
    accept_len = torch.tensor(lens, dtype=torch.long)
    indptr = torch.zeros(batch.batch_size + 1, dtype=torch.long)
    indptr[1:] = (accept_len + 1).cumsum(0)
    return VerifyResult(accept_len=accept_len, accepted_nodes=nodes, accepted_flat=torch.tensor(flat, device=dev),
                        accepted_indptr=indptr, bonus_tokens=torch.tensor(bonus), emitted_tokens=emitted)


def _deepest_accepted(children: list[list[int]], toks: list[int], pred: list[int], off: int) -> list[int]:
    """Local ids root..node of the deepest node whose path agrees with the argmax at every
    parent; among equally deep ones the first in canonical order (duplicate sibling drafts,
    e.g. a lookup token equal to a head's, are all explored)."""
    best = [0]
    stack = [[0]]
    while stack:
        path = stack.pop()
        node = path[-1]
        if len(path) > len(best) or (len(path) == len(best) and node < best[-1]):
            best = path
        want = pred[off + node]
        for c in reversed(children[node]):
            if toks[off + c] == want:
                stack.append(path + [c])
    return best


def sample_verify(batch: RaggedTreeBatch, node_tokens: torch.Tensor, target_logits: torch.Tensor,
                  temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  generator: torch.Generator | None = None) -> VerifyResult:
    """Lossless tree rejection sampling (module docstring); temperature 0 rows follow greedy rules."""
    dev = target_logits.device
    B, D = batch.batch_size, batch.max_depth
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=dev).reshape(-1).expand(B)
    greedy = temperature <= 0
    if bool(greedy.all()):
        return greedy_verify(batch, node_tokens, target_logits)  # the common case: skip the sampling loop
    kids = batch.children_global()
    starts = batch.node_indptr[:-1]
    cur = starts.clone()
    active = torch.ones(B, dtype=torch.bool, device=dev)
    nodes = torch.full((B, D + 1), -1, dtype=torch.long, device=dev)
    nodes[:, 0] = 0
    bonus = torch.zeros(B, dtype=torch.long, device=dev)
    for step in range(D + 1):
        resid = apply_sampling_filters(target_logits[cur], temperature, top_p, top_k)
        moved = torch.zeros(B, dtype=torch.bool, device=dev)
        nxt = cur.clone()
        for slot in range(kids.shape[1]):
            child = kids[cur, slot]
            trying = active & ~moved & (child >= 0)
            x = torch.where(trying, node_tokens[child.clamp(min=0)], 0).unsqueeze(1)
            px = resid.gather(1, x).squeeze(1)
            u = torch.rand(B, device=dev, generator=generator)
            take = trying & (u * resid.sum(dim=1) < px)
            drop = trying & ~take
            resid.scatter_(1, x, torch.where(drop, 0.0, px).unsqueeze(1))
            moved |= take
            nxt = torch.where(take, child, nxt)
        bonus = torch.where(active & ~moved, sample_from(resid, generator), bonus)
        active &= moved
        cur = nxt
        if step < D:
            nodes[:, step + 1] = torch.where(active, cur - starts, -1)
    if bool(greedy.any()):
        pred = target_logits.argmax(dim=-1)
        g_nodes, g_last = _greedy_path(batch, node_tokens, pred)
        nodes = torch.where(greedy.unsqueeze(1), g_nodes, nodes)
        bonus = torch.where(greedy, pred[g_last], bonus)
    return _finish(batch, nodes, bonus, node_tokens)
