"""Attention with torch's scaled_dot_product_attention (CPU and GPU).

A ragged batch is padded to [B, max_q] queries and [B, max_kv] keys once per forward (plan);
each layer then gathers its K/V rows by slot and makes one SDPA call for the whole batch.
GQA without copying K/V: the G query heads sharing a KV head are folded into the query-length
axis ([B, kv_heads, G*q, d]), so K and V are read once per KV head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from srt_entmtp.model.attention.base import AttentionBackend
from srt_entmtp.model.forward_batch import ForwardBatch


class SdpaBackend(AttentionBackend):
    def plan(self, fb: ForwardBatch) -> None:
        dev = fb.input_ids.device
        B, Tq, S = fb.batch_size, max(fb.q_lens), max(fb.kv_lens)
        self.B, self.Tq, self.S = B, Tq, S
        self._out_slots = fb.out_slots
        q_lens = torch.tensor(fb.q_lens, device=dev)
        kv_lens = torch.tensor(fb.kv_lens, device=dev)
        prefix = kv_lens - q_lens
        self.kv_slice = None
        self.pad_index = None
        if B == 1:
            # one request whose slots are one ascending run: read the cache through a view
            first = int(fb.kv_indices[0])
            if bool((fb.kv_indices == torch.arange(first, first + S, device=dev)).all()):
                self.kv_slice = (first, first + S)
            else:
                self.kv_gather = fb.kv_indices.view(1, S)
        else:
            req = torch.repeat_interleave(torch.arange(B, device=dev), q_lens)
            tok_t = torch.arange(fb.num_tokens, device=dev) - fb.qo_indptr[:-1][req]
            self.pad_index = req * Tq + tok_t
            s = torch.arange(S, device=dev)
            valid_kv = s[None, :] < kv_lens[:, None]
            gather = fb.kv_indptr[:-1, None] + s[None, :]
            self.kv_gather = torch.where(valid_kv, fb.kv_indices[gather.clamp(max=fb.kv_indices.numel() - 1)], 0)
        self.mask = self._build_mask(fb, B, Tq, S, q_lens, kv_lens, prefix, dev)

    def _build_mask(self, fb, B, Tq, S, q_lens, kv_lens, prefix, dev):
        """[B, 1, Tq, S] bool (True = may attend), or None when nothing is masked."""
        if fb.custom_mask is None and Tq == 1 and B == 1:
            return None  # a lone decode token sees everything
        t = torch.arange(Tq, device=dev).view(1, Tq, 1)
        s = torch.arange(S, device=dev).view(1, 1, S)
        pre = prefix.view(B, 1, 1)
        ql = q_lens.view(B, 1, 1)
        rel = s - pre  # key index among the request's new tokens (negative: prefix)
        if fb.custom_mask is None:
            allowed = rel <= t
        else:
            # look up each request's [q, q] block in the flat mask
            offs = torch.zeros(B, dtype=torch.long, device=dev)
            offs[1:] = (q_lens * q_lens).cumsum(0)[:-1]
            in_new = (rel >= 0) & (rel < ql) & (t < ql)
            idx = offs.view(B, 1, 1) + t * ql + rel.clamp(min=0)
            block = fb.custom_mask[idx.clamp(max=fb.custom_mask.numel() - 1)] & in_new
            allowed = (rel < 0) | block
        allowed = allowed & (s < kv_lens.view(B, 1, 1)) & (t < ql)
        allowed[:, :, 0] |= (t.view(1, Tq) >= ql.view(B, 1))  # padded query rows: one key, no NaN
        return allowed.unsqueeze(1)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        if k is not None:
            kc[self._out_slots] = k
            vc[self._out_slots] = v
        B, Tq, S = self.B, self.Tq, self.S
        H, Hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        G = H // Hk
        if self.kv_slice is not None:
            a, b = self.kv_slice
            keys, vals = kc[a:b].unsqueeze(0), vc[a:b].unsqueeze(0)
        else:
            keys, vals = kc[self.kv_gather], vc[self.kv_gather]
        keys = keys.permute(0, 2, 1, 3)  # [B, Hk, S, d]
        vals = vals.permute(0, 2, 1, 3)
        if self.pad_index is not None:
            qp = q.new_zeros(B * Tq, H, d)
            qp[self.pad_index] = q
            q = qp
        # [B*Tq, H, d] -> [B, Hk, G*Tq, d]: the G heads of a KV group as extra query rows
        qg = q.reshape(B, Tq, Hk, G, d).permute(0, 2, 3, 1, 4).reshape(B, Hk, G * Tq, d)
        mask = self.mask
        if mask is not None:
            mask = mask.unsqueeze(2).expand(B, 1, G, Tq, S).reshape(B, 1, G * Tq, S)
        out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask, scale=self.scale)
        out = out.view(B, Hk, G, Tq, d).permute(0, 3, 1, 2, 4).reshape(B * Tq, H * d)
        if self.pad_index is not None:
            out = out[self.pad_index]
        return out
