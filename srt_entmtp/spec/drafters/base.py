"""What every drafter shares: the proposal contract, tree planning, output projection, files.

At a decoding step a request brings `hidden` (h_t, the final-normed state of its last accepted
token) and `root` (the pending token x_{t+1}, the tree's root, known to be right). A node at
depth d proposes x_{t+1+d}; its token is the r-th best candidate (r = the node's rank) of the
draft distribution attached to its parent. Drafters differ only in where that distribution
comes from:

* independent (Medusa): one distribution per (request, depth), whatever the parent;
* sequential (Hydra, MTP): one per internal node, computed from h_t and the tokens on the path
  root..node, one batched pass per depth over all internal nodes of that depth in the batch.

The tree structure is known on the host (trees are interned objects), so the per-depth index
tensors are derived there, cached per batch composition, and moved to the device in one copy;
a step then runs only tensor ops, a loop over depth and none over nodes.

Heads hold their own parameters only. The base model's input embedding, LM head and final
norm are shared by reference (never copied into the heads file); a compressed draft vocabulary
(`draft_vocab`, the N most frequent tokens of the self-distilled data) gathers N rows of the LM
head once at load and maps candidate indices back to full-vocabulary ids.
"""
from __future__ import annotations

import json
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from srt_entmtp.errors import ModelLoadError
from srt_entmtp.model import fused
from srt_entmtp.model.linear import Int8Linear, Linear, int8_available, onednn_available
from srt_entmtp.spec.drafters import fused_draft

if TYPE_CHECKING:
    from srt_entmtp.model.llama import LlamaModel
    from srt_entmtp.spec.ragged import RaggedTreeBatch

FORMAT = "entmtp-heads"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
UNBOUNDED_DEPTH = sys.maxsize  # a recursive drafter (MTP) can fill a tree of any depth

TOPK_CHUNKS = 32  # chunks per row of the two-pass top-k (top_k)


def top_k(x: torch.Tensor, k: int, two_pass: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row (last dim), largest first.

    On CUDA a long row takes two passes: the top k of each of TOPK_CHUNKS chunks, then the top
    k of those winners. torch's top-k runs one thread block per row, so a few draft rows over
    the 16k draft vocabulary took ~50 us a call on the H200, 10-13% of a batch-1 drafted step;
    the chunks spread a row over many blocks. (Two Triton kernels for the same two passes made
    the drafted steps slower on the H200, 2026-12-01: docs/gpu.md.) The values are the same as
    one pass; among equal values the order may differ (either is a valid top k, and verification
    decides)."""
    V = x.shape[-1]
    if two_pass is None:
        two_pass = x.is_cuda and V >= 4096 and k <= 64
    if not two_pass or V < TOPK_CHUNKS * k:
        return x.topk(k, dim=-1)
    G = TOPK_CHUNKS
    pad = (-V) % G
    if pad:
        x = F.pad(x, (0, pad), value=float("-inf"))
    n = (V + pad) // G
    v1, i1 = x.view(*x.shape[:-1], G, n).topk(k, dim=-1)                       # [..., G, k]
    i1 = i1 + torch.arange(0, G * n, n, device=x.device).view(G, 1)
    v2, j = v1.flatten(-2).topk(k, dim=-1)
    return v2, i1.flatten(-2).gather(-1, j)


class HeadsLoadError(ModelLoadError):
    """A heads directory is missing, malformed, or made for another model."""


@dataclass
class DraftOutput:
    node_tokens: torch.Tensor   # LongTensor[T]: drafted token of each node (roots: the root tokens)
    node_probs: torch.Tensor    # FloatTensor[T]: the token's probability under its parent's draft distribution (roots 1)
    path_conf: torch.Tensor     # FloatTensor[T]: product of node_probs along the path root..node


# ---- the base model as seen by heads ------------------------------------------------------------

def base_model_name(base: Any) -> str | None:
    """The name heads are keyed on: a ModelRunner's directory name, else `base.name`; None for a
    bare LlamaModel, which does not know its checkpoint (its config's `_name_or_path` is the
    temporary directory of the GGUF conversion for the default model)."""
    model_dir = getattr(base, "model_dir", None)
    if model_dir is not None:
        return Path(model_dir).name
    name = getattr(base, "name", None)
    return str(name) if name else None


def base_probe(base: Any) -> list[float]:
    """32 embedding values spread over the vocabulary: identifies the base weights whatever the
    checkpoint is called, and survives float32 <-> bfloat16 (compared with a loose tolerance)."""
    model = as_llama(base)
    V = model.cfg.vocab_size
    rows = torch.tensor([(i * V) // 8 for i in range(8)], device=model.embed.device)
    return [round(float(x), 5) for x in model.embed[rows, :4].float().flatten().cpu()]


def as_llama(base: Any) -> LlamaModel:
    """Accept a LlamaModel or anything holding one as `.model` (a ModelRunner)."""
    return base.model if hasattr(base, "model") and hasattr(base.model, "lm_head") else base


def rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back to x's dtype (then scaled, as the base model does).
    At inference on the GPU in bf16 it is the model's fused kernel (one launch instead of seven:
    drafting runs inside the speculative step's CUDA graph, where kernel count is the cost)."""
    if w is not None and not torch.is_grad_enabled() and fused.enabled(x) and w.dtype == x.dtype:
        return fused.rms_norm(x, w, eps)
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if w is None else y * w


# ---- per-batch plan -------------------------------------------------------------------------------

@dataclass
class Level:
    """Filling depth L+1 from the distributions attached to the nodes at depth L."""
    parents: torch.Tensor       # [p] flat ids of the internal nodes at depth L (they get a distribution)
    parent_req: torch.Tensor    # [p] their request
    parent_parent: torch.Tensor  # [p] flat id of their own parent (-1 for roots)
    children: torch.Tensor      # [c] flat ids of the nodes at depth L+1
    child_row: torch.Tensor     # [c] row of the child's parent in `parents`
    child_req: torch.Tensor     # [c] the child's request
    child_rank: torch.Tensor    # [c] candidate rank of the child
    child_parent: torch.Tensor  # [c] flat id of the child's parent
    k: int                      # candidates needed at this depth: max rank + 1


@dataclass
class Plan:
    num_nodes: int
    roots: torch.Tensor         # [B] flat id of each request's root
    levels: list[Level]
    max_rank: int

    @property
    def depth(self) -> int:
        return len(self.levels)


def build_plan(trees: list, device: torch.device) -> Plan:
    """Host-side derivation of the per-depth index tensors for a batch of trees (no per-node loop)."""
    counts = torch.tensor([t.num_nodes for t in trees], dtype=torch.long)
    offs = torch.zeros(len(trees), dtype=torch.long)
    offs[1:] = counts.cumsum(0)[:-1]
    req = torch.repeat_interleave(torch.arange(len(trees)), counts)
    depths = torch.cat([t.depths for t in trees])
    ranks = torch.cat([t.ranks for t in trees])
    par_local = torch.cat([t.parents for t in trees])
    parents = torch.where(par_local >= 0, par_local + offs[req], torch.full_like(par_local, -1))
    T = int(counts.sum())
    has_child = torch.zeros(T, dtype=torch.bool)
    has_child[parents[parents >= 0]] = True
    max_depth = max(t.depth for t in trees)
    pieces: list[torch.Tensor] = [offs]
    shapes: list[tuple[int, ...]] = []
    ks = []
    for L in range(max_depth):
        internal = torch.nonzero(has_child & (depths == L)).flatten()
        children = torch.nonzero(depths == L + 1).flatten()
        row_of = torch.full((T,), -1, dtype=torch.long)
        row_of[internal] = torch.arange(internal.numel())
        cpar = parents[children]
        lvl = [internal, req[internal], parents[internal], children, row_of[cpar], req[children], ranks[children], cpar]
        pieces += lvl
        shapes.append(tuple(int(x.numel()) for x in lvl))
        ks.append(int(ranks[children].max()) + 1)
    flat = torch.cat(pieces).to(device, non_blocking=True)  # one host-to-device copy per composition
    roots, rest = flat[: len(trees)], flat[len(trees):]
    levels, a = [], 0
    for sh, k in zip(shapes, ks):
        parts = []
        for n in sh:
            parts.append(rest[a: a + n])
            a += n
        levels.append(Level(*parts, k=k))
    return Plan(num_nodes=T, roots=roots, levels=levels, max_rank=max(ks, default=1) - 1)


class _PlanCache:
    def __init__(self, size: int = 128):
        self.size = size
        self._d: OrderedDict = OrderedDict()

    def get(self, trees: list, device: torch.device) -> Plan:
        key = (tuple(trees), str(device))
        plan = self._d.get(key)
        if plan is None:
            plan = build_plan(trees, device)
            self._d[key] = plan
            if len(self._d) > self.size:
                self._d.popitem(last=False)
        else:
            self._d.move_to_end(key)
        return plan


# ---- the drafter base class -----------------------------------------------------------------------

class Drafter(nn.Module):
    """Draft heads on a frozen base model. Subclasses define their parameters and either
    `head_logits` (independent) or `step` + `state_logits` (sequential)."""

    kind: str = ""
    sequential: bool = False

    def __init__(self, base: Any, *, draft_vocab: torch.Tensor | None = None, base_name: str | None = None):
        super().__init__()
        model = as_llama(base)
        self.hidden_size = model.cfg.hidden_size
        self.vocab_size = model.cfg.vocab_size
        self.eps = model.cfg.rms_norm_eps
        self.base_name = base_name if base_name is not None else (base_model_name(base) or "")
        self.base_probe = base_probe(base)
        # shared with the base model by reference: plain attributes, so never saved or trained
        self.embed = model.embed
        self.lm_head = model.lm_head
        self.base_final_norm = model.final_norm
        self._base_lm_head_linear = getattr(model, "lm_head_linear", None)
        if draft_vocab is not None:
            dv = torch.as_tensor(draft_vocab, dtype=torch.long).flatten().to(model.lm_head.device)
            if dv.numel() == 0 or int(dv.min()) < 0 or int(dv.max()) >= self.vocab_size:
                raise ValueError(f"draft_vocab must hold token ids in [0, {self.vocab_size}), got {dv.numel()} ids "
                                 f"in [{int(dv.min()) if dv.numel() else '-'}, {int(dv.max()) if dv.numel() else '-'}]")
            if torch.unique(dv).numel() != dv.numel():
                raise ValueError("draft_vocab has repeated token ids")
            self.register_buffer("draft_vocab", dv)
            self.out_weight = model.lm_head.index_select(0, dv)  # gathered once: [N, H]
        else:
            self.draft_vocab = None
            self.out_weight = model.lm_head
        self._plans = _PlanCache()
        self.training_summary: dict = {}
        self.int8 = False  # set by quantize_for_inference(): int8 weights for drafting on CPU

    # -- properties ---------------------------------------------------------------------------
    @property
    def draft_vocab_size(self) -> int:
        return int(self.out_weight.shape[0])

    @property
    def max_depth(self) -> int:
        raise NotImplementedError

    @property
    def trained_depth(self) -> int:
        return self.max_depth

    def arch(self) -> dict:
        """Constructor arguments that define the parameter shapes (saved in config.json)."""
        raise NotImplementedError

    def quantize_for_inference(self, mode: str = "auto") -> bool:
        """Draft with int8 weights (`mode` int8, or auto where int8 linears run: CPU float32).
        Lossless for the output, since drafts are only proposals the float model verifies; it
        changes which tokens are proposed a little. Returns whether int8 is now on."""
        if mode not in ("auto", "int8", "model"):
            raise ValueError(f"draft dtype must be auto, int8 or model, got {mode!r}")
        ok = int8_available(self.lm_head.device, self.param_dtype)
        if mode == "int8" and not ok:
            raise ValueError(f"int8 drafting needs a CPU float32 model with torch's fbgemm/x86 quantised engine "
                             f"(have {self.lm_head.device}, {self.param_dtype})")
        self.int8 = mode != "model" and ok
        self.__dict__.pop("_out_linear", None)
        self.__dict__.pop("_packed", None)
        return self.int8

    def to_full(self, idx: torch.Tensor) -> torch.Tensor:
        """Candidate indices in the draft vocabulary -> full-vocabulary token ids."""
        return idx if self.draft_vocab is None else self.draft_vocab[idx]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (the base LM head, or its gathered rows)."""
        if not torch.is_grad_enabled() and onednn_available(x.device, x.dtype):
            # inference on CPU fp32: oneDNN pre-packed weights, ~6x faster than F.linear's MKL
            # GEMM for the few rows drafting asks for (34 ms -> 6 ms for 3 rows of the 49k head)
            return self._packed_out(x)
        w = self.out_weight
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
        if x.dim() == 2:
            return F.linear(x, w)
        return F.linear(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])  # one GEMM, not a batch

    def _packed_out(self, x: torch.Tensor) -> torch.Tensor:
        lin = getattr(self, "_out_linear", None)
        if lin is None:
            base_lin = getattr(self, "_base_lm_head_linear", None)
            if self.int8:
                lin = Int8Linear(self.out_weight)
            elif self.draft_vocab is None and base_lin is not None and base_lin.packed:
                lin = base_lin  # the full head is the base model's: share its packed copy
            else:
                lin = Linear(self.out_weight.contiguous(), pack=True)
            self._out_linear = lin
        return lin(x)

    def linear(self, key: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear, or in CPU fp32 inference a pre-packed oneDNN copy of `w` cached under `key`
        (rebuilt when training has changed the weight since: tensors count in-place updates)."""
        if torch.is_grad_enabled() or not onednn_available(x.device, x.dtype) or w.dtype != x.dtype:
            return F.linear(x, w, b)
        cache = self.__dict__.setdefault("_packed", {})
        hit = cache.get(key)
        if hit is None or hit[0] != w._version:
            bias = None if b is None else b.detach().contiguous()
            lin = Int8Linear(w, bias) if self.int8 else Linear(w.detach().contiguous(), bias, pack=True)
            hit = (w._version, lin)
            cache[key] = hit
        return hit[1](x)

    def embed_tokens(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        e = F.embedding(tokens, self.embed)
        return e if e.dtype == like.dtype else e.to(like.dtype)

    # -- the model, for training and reference computations -----------------------------------
    def head_logits(self, hidden: torch.Tensor, depths: int) -> torch.Tensor:
        """Independent drafters: [depths, N, V'] logits of heads 1..depths."""
        raise NotImplementedError

    def step(self, d: int, state: torch.Tensor, token_emb: torch.Tensor) -> torch.Tensor:
        """Sequential drafters: state after the path token of depth d-1 (x_{t+d}), s_d from s_{d-1}."""
        raise NotImplementedError

    def state_logits(self, d: int, state: torch.Tensor) -> torch.Tensor:
        """Sequential drafters: logits of x_{t+1+d} from s_d."""
        raise NotImplementedError

    # sequential drafters whose state_logits(d, s) is project(rms(s, logits_norm(d))) (project(s)
    # where that is None) may draft a level with the fused kernels (fused_draft.py)
    fused_logits = False
    fused_levels = True  # an instance may set False: the torch form (benchmarks' A/B)

    def logits_norm(self, d: int) -> torch.Tensor | None:
        raise NotImplementedError

    gathers_rows = False  # whether a fused_step with rows= gathers them in a kernel (fused_draft.draft_tree)

    def fused_step(self, d: int, state: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """step(d, state[rows] (rows None: state), embedding of tokens); drafters with a fused form
        override this."""
        if rows is not None:
            state = state[rows]
        return self.step(d, state, self.embed_tokens(tokens, state))

    def path_logits(self, hidden: torch.Tensor, path_tokens: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced logits: hidden [N, H] = h_t, path_tokens [N, D] = x_{t+1}..x_{t+D};
        returns D tensors [N, V'], the d-th being the distribution of x_{t+1+d}."""
        D = path_tokens.shape[1]
        if D > self.max_depth:
            raise ValueError(f"{self.kind} heads reach depth {self.max_depth}; asked for {D}")
        if not self.sequential:
            return list(self.head_logits(hidden, D).unbind(0))
        out, s = [], hidden
        emb = self.embed_tokens(path_tokens, hidden)
        for d in range(1, D + 1):
            s = self.step(d, s, emb[:, d - 1])
            out.append(self.state_logits(d, s))
        return out

    # -- proposal -----------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, hidden: torch.Tensor, root_tokens: torch.Tensor, batch: RaggedTreeBatch) -> DraftOutput:
        """Fill every tree of `batch` (see module docstring); hidden [B, H], root_tokens [B]."""
        dev = hidden.device
        B = batch.batch_size
        if hidden.shape != (B, self.hidden_size):
            raise ValueError(f"hidden must be [{B}, {self.hidden_size}], got {tuple(hidden.shape)}")
        depth = max(t.depth for t in batch.trees)
        if depth > self.max_depth:
            raise ValueError(f"a tree of depth {depth} was asked of {self.kind} heads that reach depth {self.max_depth}")
        plan = self._plans.get(batch.trees, dev)
        if plan.max_rank >= self.draft_vocab_size:
            raise ValueError(f"rank {plan.max_rank} asked of a draft vocabulary of {self.draft_vocab_size} tokens")
        h = hidden if hidden.dtype == self.param_dtype else hidden.to(self.param_dtype)
        T = plan.num_nodes
        tokens = torch.zeros(T, dtype=torch.long, device=dev)
        tokens[plan.roots] = root_tokens.to(dev, torch.long)
        probs = torch.ones(T, dtype=torch.float32, device=dev)
        conf = torch.ones(T, dtype=torch.float32, device=dev)
        if plan.depth == 0:
            return DraftOutput(tokens, probs, conf)
        if self.sequential:
            state = h.new_empty(T, self.hidden_size)
        else:
            all_heads = self.head_logits(h, plan.depth)  # [D, B, V']
        for L, lv in enumerate(plan.levels):
            if lv.children.numel() == 0:
                continue
            if self.sequential:
                prev = h[lv.parent_req] if L == 0 else state[lv.parent_parent]
                s = self.step(L + 1, prev, self.embed_tokens(tokens[lv.parents], prev))
                state[lv.parents] = s
                logits, rows = self.state_logits(L + 1, s), lv.child_row
            else:
                logits, rows = all_heads[L], lv.child_req
            lse = logits.float().logsumexp(-1)
            val, idx = top_k(logits, lv.k)
            pick_val = val[rows, lv.child_rank].float()
            tokens[lv.children] = self.to_full(idx[rows, lv.child_rank])
            p = (pick_val - lse[rows]).exp()
            probs[lv.children] = p
            conf[lv.children] = conf[lv.child_parent] * p
        return DraftOutput(tokens, probs, conf)

    @torch.no_grad()
    def propose_layout(self, hidden: torch.Tensor, root_tokens: torch.Tensor, layout, parent_in_level: torch.Tensor,
                       rank: torch.Tensor) -> torch.Tensor:
        """Fill trees placed in a fixed layout (spec/tree_layout.py): hidden [B, H], root_tokens
        [B], parent_in_level and rank [B, S] per slot; returns the slots' tokens [B, S]. The same
        drafts as `propose`, with shapes fixed by the layout and no host sync (CUDA-graph safe):
        every slot of a level gets a distribution, padding included (its tokens are never accepted)."""
        B, H = hidden.shape[0], self.hidden_size
        h = hidden if hidden.dtype == self.param_dtype else hidden.to(self.param_dtype)
        offs, widths = layout.offsets, layout.widths
        levels = [root_tokens.view(B, 1).to(torch.long)]
        if not self.sequential:
            heads = self.head_logits(h, layout.depth)  # [D, B, V']
        state = h.unsqueeze(1)                          # s_0 for the root's level
        for L in range(layout.depth):
            k = layout.ks[L]
            kids = slice(offs[L + 1], offs[L + 1] + widths[L + 1])
            if self.sequential:
                w = widths[L]
                if L:  # each level-L slot continues from its parent's state
                    idx = parent_in_level[:, offs[L]:offs[L] + w].unsqueeze(-1).expand(B, w, H)
                    state = state.gather(1, idx)
                prev = state.reshape(B * w, H)
                if fused_draft.usable(self, prev, k):  # GPU: ~5 kernels a level, not ~20
                    s, tok = fused_draft.draft_level(self, prev, levels[L].reshape(-1), L + 1, k,
                                                     parent_in_level[:, kids], rank[:, kids], w)
                    state = s.view(B, w, H)
                    levels.append(tok)
                    continue
                s = self.step(L + 1, prev, self.embed_tokens(levels[L].reshape(-1), prev))
                state = s.view(B, w, H)
                cand = top_k(self.state_logits(L + 1, s), k)[1].view(B, w, k)
                cand = cand.gather(1, parent_in_level[:, kids].unsqueeze(-1).expand(-1, -1, k))  # the child's parent
                pick = cand.gather(2, rank[:, kids].unsqueeze(-1)).squeeze(-1)
            else:
                pick = top_k(heads[L], k)[1].gather(1, rank[:, kids])
            levels.append(self.to_full(pick))
        return torch.cat(levels, dim=1)

    @property
    def param_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return self.lm_head.dtype

    # -- files --------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "base_model": self.base_name,
            "base_probe": self.base_probe,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "max_depth": None if self.max_depth == UNBOUNDED_DEPTH else self.max_depth,
            "trained_depth": self.trained_depth,
            "draft_vocab_size": int(self.draft_vocab.numel()) if self.draft_vocab is not None else 0,
            "arch": self.arch(),
            "training": self.training_summary,
        }

    def save(self, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
        """Write `model.safetensors` (parameters in `dtype`, draft_vocab as int64) and config.json."""
        from safetensors.torch import save_file

        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, t in self.state_dict().items():
            t = t.detach()
            tensors[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous().cpu()
        save_file(tensors, str(d / WEIGHTS_FILE), metadata={"format": FORMAT, "kind": self.kind})
        (d / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        return d

    @classmethod
    def load(cls, path: str | Path, base: Any, *, base_name: str | None = None) -> Drafter:
        """Heads from `path` on `base` (a LlamaModel or ModelRunner), in the base's dtype and device."""
        if cls is Drafter:
            return load_drafter(path, base, base_name=base_name)
        cfg = read_config(path)
        if cfg["kind"] != cls.kind:
            raise HeadsLoadError(f"{Path(path) / CONFIG_FILE}: kind is {cfg['kind']!r}, expected {cls.kind!r} "
                                 "(use load_drafter to dispatch on the file)")
        return _build(cls, path, cfg, base, base_name)


def heads_dirs_by_kind(dirs, kinds, option: str, kinds_option: str) -> dict[str, Path]:
    """Heads directories named on a command line (`option`), keyed by the kind each config.json
    names; each must be one of `kinds` (given by `kinds_option`), at most one per kind."""
    out: dict[str, Path] = {}
    for d in dirs or []:
        try:
            kind = read_config(d)["kind"]
        except HeadsLoadError as e:
            raise HeadsLoadError(f"{option}: {e}") from None
        if kind in out:
            raise HeadsLoadError(f"{option}: {out[kind]} and {d} are both {kind} heads; give one per kind")
        if kind not in kinds:
            raise HeadsLoadError(f"{option}: {d} holds {kind} heads, but {kinds_option} is {' '.join(kinds)}")
        out[kind] = Path(d)
    return out


def read_config(path: str | Path) -> dict:
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise HeadsLoadError(f"{f}: not found (a heads directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise HeadsLoadError(f"{f}: invalid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise HeadsLoadError(f"{f}: format is {cfg.get('format') if isinstance(cfg, dict) else None!r}, "
                             f"expected {FORMAT!r}")
    if cfg.get("version") != VERSION:
        raise HeadsLoadError(f"{f}: version {cfg.get('version')!r} is not supported (this build reads {VERSION})")
    for key in ("kind", "hidden_size", "vocab_size", "base_model", "arch"):
        if key not in cfg:
            raise HeadsLoadError(f"{f}: field {key!r} is missing")
    return cfg


def check_base(cfg: dict, path: str | Path, base: Any, base_name: str | None) -> None:
    """Heads made for another model fail here, naming the file and both values."""
    f = Path(path) / CONFIG_FILE
    model = as_llama(base)
    mine = {"hidden_size": model.cfg.hidden_size, "vocab_size": model.cfg.vocab_size}
    for key, have in mine.items():
        if int(cfg[key]) != have:
            raise HeadsLoadError(f"{f}: heads were trained for {key} {cfg[key]}, but the loaded model has {key} "
                                 f"{have}; these heads belong to another model ({cfg['base_model']!r})")
    name = base_name if base_name is not None else base_model_name(base)
    if name is not None and cfg["base_model"] != name:
        raise HeadsLoadError(f"{f}: heads were trained for base model {cfg['base_model']!r}, but the loaded model is "
                             f"{name!r}; train heads for this model (scripts/train_heads.py)")
    probe = cfg.get("base_probe")
    if probe is not None:
        want = torch.tensor(probe, dtype=torch.float32)
        have = torch.tensor(base_probe(base), dtype=torch.float32)
        if want.shape != have.shape or not torch.allclose(want, have, rtol=2e-2, atol=2e-3):
            raise HeadsLoadError(f"{f}: heads were trained for base model {cfg['base_model']!r}, whose embedding "
                                 f"weights differ from the loaded model's ({name or 'unnamed'}): base_probe "
                                 f"{probe[:3]}... vs {have[:3].tolist()}...; train heads for this model")


def _build(cls, path: str | Path, cfg: dict, base: Any, base_name: str | None) -> Drafter:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_base(cfg, path, base, base_name)
    wf = Path(path) / WEIGHTS_FILE
    if not wf.is_file():
        raise HeadsLoadError(f"{wf}: not found")
    try:
        tensors = load_file(str(wf))
    except (SafetensorError, OSError) as e:
        raise HeadsLoadError(f"{wf}: unreadable safetensors file: {e}") from None
    dv = tensors.pop("draft_vocab", None)
    if int(cfg.get("draft_vocab_size") or 0) != (0 if dv is None else dv.numel()):
        raise HeadsLoadError(f"{wf}: config says draft_vocab_size {cfg.get('draft_vocab_size')}, the file holds "
                             f"{0 if dv is None else dv.numel()} draft-vocabulary ids")
    model = as_llama(base)
    try:
        drafter = cls(base, draft_vocab=dv, base_name=cfg["base_model"], **cfg["arch"])
    except (TypeError, ValueError) as e:
        raise HeadsLoadError(f"{Path(path) / CONFIG_FILE}: bad arch {cfg['arch']}: {e}") from None
    own = {k: v for k, v in drafter.state_dict().items() if k != "draft_vocab"}
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise HeadsLoadError(f"{wf}: tensors do not match {cfg['kind']} arch {cfg['arch']}: "
                             f"missing {missing}, unexpected {extra}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise HeadsLoadError(f"{wf}: tensor {k!r} has shape {tuple(v.shape)}, arch {cfg['arch']} needs "
                                 f"{tuple(own[k].shape)}")
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            p.copy_(tensors[name])
    drafter.training_summary = cfg.get("training") or {}
    drafter.to(device=model.device, dtype=model.dtype)
    drafter.requires_grad_(False)
    return drafter.eval()


def load_drafter(path: str | Path, base: Any, *, base_name: str | None = None) -> Drafter:
    """Load any kind of heads, dispatching on config.json's `kind`."""
    from srt_entmtp.spec.drafters import DRAFTERS

    cfg = read_config(path)
    cls = DRAFTERS.get(cfg["kind"])
    if cls is None:
        raise HeadsLoadError(f"{Path(path) / CONFIG_FILE}: unknown kind {cfg['kind']!r}; known: {', '.join(DRAFTERS)}")
    return _build(cls, path, cfg, base, base_name)


def init_normal_(t: torch.Tensor, fan_in: int, gain: float = 1.0, generator: torch.Generator | None = None) -> None:
    with torch.no_grad():
        t.normal_(0.0, gain / math.sqrt(fan_in), generator=generator)
