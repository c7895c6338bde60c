"""Training draft heads against the frozen base model (self-distillation, Hydra++ teacher loss).

1. `TeacherData.build`: the base model runs once over every self-distilled sequence (teacher
   forcing, through the ModelRunner's own forward) and its final-normed hidden states are kept
   for every position, on the device. The base's logits at position t are exactly
   LM_head(h_t), so they are recomputed per batch instead of stored (49152 floats a token).
2. `train`: head d at position t is trained towards the base distribution at t+d,
   loss = KL(base(. | x_<=t+d) || head_d(h_t, x_{t+1}..x_{t+d})), averaged over the answer
   positions (the states a drafter sees at decode time). With a compressed draft vocabulary the
   teacher is restricted to those tokens and renormalised. AdamW, warmup + cosine schedule,
   gradient clipping, bf16 autocast on GPU, checkpoints with resume.
3. `evaluate`: per depth and task family, top-1 / top-5 accuracy against the base model's greedy
   token at the corresponding position (a compressed head misses tokens outside its vocabulary).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from srt_entmtp.spec.drafters import Drafter

log = logging.getLogger(__name__)

FAMILY_IDS = {"code": 0, "math": 1, "chat": 2, "writing": 3}
FAMILY_NAMES = {v: k for k, v in FAMILY_IDS.items()}


# ---- teacher forcing ---------------------------------------------------------------------------------

@dataclass
class TeacherData:
    tokens: torch.Tensor     # [N] long: every sequence's tokens, concatenated
    hidden: torch.Tensor     # [N, H] the base's final-normed hidden state at each token (model dtype)
    limit: torch.Tensor      # [N] last flat index whose hidden state gives a target in this token's sequence
    family: torch.Tensor     # [N] task family id of the token's sequence
    starts: dict[str, torch.Tensor]  # split -> flat positions t that train/evaluate (answer positions)
    seconds: float = 0.0
    greedy: torch.Tensor | None = None  # [N] bool: the token's sequence was answered greedily

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @classmethod
    @torch.inference_mode()
    def build(cls, runner, records: list[dict], max_tokens: int = 8192, progress: bool = True,
              val_split: bool = True) -> TeacherData:
        """Run the base model over `records` (dicts with tokens, prompt_len, task, split, finish).

        With `val_split`, every other held-out record becomes "val" (model selection during
        training), the rest stay "eval" (the reported accuracy), so neither sees the other."""
        from tqdm import tqdm

        from srt_entmtp.model.forward_batch import ForwardBatch

        t0 = time.perf_counter()
        dev = runner.device
        kv = runner.kv
        budget = min(max_tokens, kv.num_free)
        lens = [len(r["tokens"]) for r in records]
        if max(lens) > budget:
            raise ValueError(f"a sequence of {max(lens)} tokens does not fit {budget} KV slots; raise kv_slots")
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + n)
        N = offs[-1]
        hidden = torch.empty(N, runner.config.hidden_size, dtype=runner.dtype, device=dev)
        order = sorted(range(len(records)), key=lambda i: lens[i])  # similar lengths share a padded batch
        groups, cur, cur_n = [], [], 0
        for i in order:
            if cur and cur_n + lens[i] > budget:
                groups.append(cur)
                cur, cur_n = [], 0
            cur.append(i)
            cur_n += lens[i]
        if cur:
            groups.append(cur)
        bar = tqdm(total=N, desc="teacher forcing", unit="tok", disable=not progress, mininterval=2.0)
        for g in groups:
            slots = [kv.alloc(lens[i]) for i in g]
            try:
                fb = ForwardBatch.build([torch.tensor(records[i]["tokens"], dtype=torch.long) for i in g],
                                        [torch.empty(0, dtype=torch.long)] * len(g), slots, device=dev)  # slots live on the host
                # the runner's forward minus the [tokens, vocab] logits nobody needs here
                runner.attn.plan(fb)
                h = runner.model.forward(fb.input_ids, fb.positions, runner.attn)
            finally:
                for s in slots:
                    kv.free(s)
            a = 0
            for i in g:
                hidden[offs[i]: offs[i] + lens[i]] = h[a: a + lens[i]]
                a += lens[i]
            bar.update(sum(lens[i] for i in g))
        bar.close()

        tokens = torch.tensor([t for r in records for t in r["tokens"]], dtype=torch.long)
        limit = torch.empty(N, dtype=torch.long)
        family = torch.empty(N, dtype=torch.long)
        greedy = torch.zeros(N, dtype=torch.bool)
        starts: dict[str, list[torch.Tensor]] = {}
        n_eval = 0
        for i, r in enumerate(records):
            split = r["split"]
            if split == "eval" and val_split:
                split = "val" if n_eval % 2 else "eval"
                n_eval += 1
            a, b = offs[i], offs[i + 1]
            # the last token's state predicts past the end: a target only if generation was cut by length
            last = b - 1 if r.get("finish") == "length" else b - 2
            limit[a:b] = last
            family[a:b] = FAMILY_IDS.get(r["task"], len(FAMILY_IDS))
            greedy[a:b] = r.get("mode") == "greedy"
            first = a + max(int(r["prompt_len"]) - 1, 0)
            if last - 1 >= first:
                starts.setdefault(split, []).append(torch.arange(first, last))
        st = {k: torch.cat(v).to(dev) for k, v in starts.items()}
        return cls(tokens.to(dev), hidden, limit.to(dev), family.to(dev), st, time.perf_counter() - t0,
                   greedy.to(dev))

    def batch(self, t: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For positions t [n]: h_t [n, H], path tokens x_{t+1..t+D} [n, D], target index t+d [n, D],
        valid [n, D] (t+d within the sequence's targets)."""
        d = torch.arange(1, depth + 1, device=t.device)
        tgt = t[:, None] + d[None, :]
        valid = tgt <= self.limit[t][:, None]
        tgt = tgt.clamp(max=self.tokens.numel() - 1)
        return self.hidden[t], self.tokens[tgt], tgt, valid


# ---- loss ---------------------------------------------------------------------------------------------

class _SoftKL(torch.autograd.Function):
    """Row-wise KL(p || softmax(z)) with p = softmax(teacher logits); keeps only the gradient
    (softmax(z) - p) for backward, one [n, V] float tensor instead of several."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(teacher.float(), dim=-1)
        logq = torch.log_softmax(z.float(), dim=-1)
        p = logp.exp()
        kl = (p * (logp - logq)).sum(-1)
        ctx.save_for_backward((logq.exp_() - p).to(z.dtype))
        return kl

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype)[:, None], None


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return _SoftKL.apply(student_logits, teacher_logits)


def depth_losses(drafter: Drafter, data: TeacherData, t: torch.Tensor, depth: int,
                 amp_dtype: torch.dtype | None, noise: float = 0.0,
                 generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Mean KL per depth over the valid rows, and the valid counts [D]. With `noise`, the heads'
    input hidden states get Gaussian noise of that size relative to each row's RMS (training
    only: a regulariser in the spirit of EAGLE's feature noise; the teacher is untouched)."""
    h, path, tgt, valid = data.batch(t, depth)
    if noise > 0:
        hf = h.float()
        eps = torch.randn(h.shape, device=h.device, generator=generator)
        h = (hf + noise * hf.pow(2).mean(-1, keepdim=True).sqrt() * eps).to(h.dtype)
    dev_type = h.device.type
    with torch.autocast(dev_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        student = drafter.path_logits(h if amp_dtype else h.float(), path)
        losses = []
        for d in range(depth):
            with torch.no_grad():
                ht = data.hidden[tgt[:, d]]
                teacher = drafter.project(ht if amp_dtype else ht.float())
            kl = soft_kl(student[d], teacher)
            w = valid[:, d].float()
            losses.append((kl * w).sum() / w.sum().clamp(min=1.0))
    return losses, valid.sum(0)


# ---- training -----------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    steps: int = 2000
    batch_positions: int = 1024
    depth: int = 5                      # depths trained (<= the drafter's max_depth)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    depth_decay: float = 1.0            # loss weight of depth d: decay**(d-1), normalised
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 500
    val_every: int = 250                # held-out KL on the "val" split; the best weights are kept
    val_positions: int = 4096
    amp: bool = True                    # bf16 autocast on CUDA (never on CPU)
    feature_noise: float = 0.0          # Gaussian noise on the heads' input hidden states, x each row's RMS
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def val_loss(drafter: Drafter, data: TeacherData, positions: torch.Tensor, depth: int, weights: torch.Tensor,
             amp_dtype: torch.dtype | None, batch: int = 1024) -> float:
    """Depth-weighted mean KL over `positions` (the training objective, without gradients)."""
    tot = torch.zeros(depth, dtype=torch.float64, device=positions.device)
    cnt = torch.zeros(depth, dtype=torch.float64, device=positions.device)
    for a in range(0, positions.numel(), batch):
        losses, n = depth_losses(drafter, data, positions[a:a + batch], depth, amp_dtype)
        tot += torch.stack(losses).double() * n
        cnt += n
    return float(((tot / cnt.clamp(min=1)) * weights.double()).sum())


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        prog = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
    return f


def _save_ckpt(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(drafter: Drafter, data: TeacherData, cfg: TrainConfig, ckpt_path: Path | None = None,
          resume: bool = True, progress: bool = True, stop_after: int | None = None,
          time_budget_s: float | None = None) -> dict:
    """Train `drafter`'s own parameters in place; returns the training log (losses, times).

    With `ckpt_path`, a checkpoint is written every cfg.ckpt_every steps and at the end, and a
    run resumes from it; `stop_after` ends this call after that many steps (checkpointed), so a
    long run can be split over several calls. With `time_budget_s`, the step time is measured
    over the first steps and cfg.steps is lowered (before the cosine decay starts) to fit."""
    from dataclasses import replace

    from tqdm import tqdm

    cfg = replace(cfg)  # the schedule reads cfg.steps, which a time budget may lower

    dev = data.device
    depth = min(cfg.depth, drafter.max_depth)
    amp_dtype = torch.bfloat16 if (cfg.amp and dev.type == "cuda") else None
    drafter.train()
    drafter.float()  # fp32 master weights; the base's tensors are untouched (not parameters)
    params = [p for p in drafter.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=dev.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    w = torch.tensor([cfg.depth_decay ** d for d in range(depth)], device=dev)
    w = w / w.sum()
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    starts = data.starts["train"]
    val = data.starts.get("val")
    if val is not None and val.numel() > cfg.val_positions:
        pick = torch.randperm(val.numel(), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.val_positions]
        val = val[pick.to(dev)]
    track = val is not None and val.numel() > 0 and cfg.val_every > 0
    best = {"loss": math.inf, "step": 0, "state": None}
    history: list[dict] = []
    val_history: list[dict] = []
    step, elapsed = 0, 0.0
    data_id = [int(starts.numel()), int(data.tokens.sum())]  # a checkpoint only resumes on the same data
    ck = None
    if ckpt_path is not None and resume and Path(ckpt_path).is_file():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if ck.get("data_id") != data_id:
            log.warning("%s was made on other data; starting %s afresh", ckpt_path, drafter.kind)
            ck = None
    if ck is not None:
        if ck.get("kind") != drafter.kind or ck.get("arch") != drafter.arch():
            raise ValueError(f"{ckpt_path}: checkpoint is for {ck.get('kind')} {ck.get('arch')}, "
                             f"not {drafter.kind} {drafter.arch()}; delete it or use another --out")
        drafter.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        sched.load_state_dict(ck["sched"])
        gen.set_state(ck["rng"].cpu())
        step, history, elapsed = ck["step"], ck["history"], ck["elapsed"]
        best = ck.get("best", best)
        val_history = ck.get("val_history", [])
        log.info("resumed %s from %s at step %d", drafter.kind, ckpt_path, step)

    def checkpoint():
        if ckpt_path is not None:
            _save_ckpt(Path(ckpt_path), {"kind": drafter.kind, "arch": drafter.arch(), "step": step,
                                         "model": drafter.state_dict(), "optim": opt.state_dict(),
                                         "sched": sched.state_dict(), "rng": gen.get_state(),
                                         "history": history, "elapsed": elapsed, "config": asdict(cfg),
                                         "best": best, "val_history": val_history, "data_id": data_id})

    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {drafter.kind}", disable=not progress, mininterval=1.0)
    t_last = time.perf_counter()
    t_call = t_last
    probe = (step + 5, step + 25) if time_budget_s else None
    t_probe = 0.0
    run_loss = None
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    while step < end:
        idx = torch.randint(0, starts.numel(), (cfg.batch_positions,), device=dev, generator=gen)
        losses, _ = depth_losses(drafter, data, starts[idx], depth, amp_dtype, cfg.feature_noise, gen)
        per_depth = torch.stack(losses)
        loss = (per_depth * w).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        step += 1
        if probe is not None and step in probe:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if step == probe[0]:
                t_probe = time.perf_counter()
            else:
                per_step = (time.perf_counter() - t_probe) / (probe[1] - probe[0])
                left = time_budget_s - (time.perf_counter() - t_call)
                fit = step + max(0, int(left / per_step))
                if fit < cfg.steps:
                    log.info("%s: %.1f ms/step; %d steps fit the %.0fs budget (of %d asked)", drafter.kind,
                             per_step * 1e3, fit, time_budget_s, cfg.steps)
                    cfg.steps = max(fit, cfg.warmup + 1, step)
                    end = min(end, cfg.steps)
                    bar.total = cfg.steps
                probe = None
        if step % cfg.log_every == 0 or step == end or step == 1:
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            vals = per_depth.detach().float().cpu().tolist()
            history.append({"step": step, "loss": round(loss.item(), 5), "kl_per_depth": [round(v, 4) for v in vals],
                            "lr": sched.get_last_lr()[0], "grad_norm": round(float(gnorm), 4),
                            "seconds": round(elapsed, 2)})
            run_loss = loss.item()
            bar.set_postfix(loss=f"{run_loss:.3f}", d1=f"{vals[0]:.2f}", dN=f"{vals[-1]:.2f}")
        if track and (step % cfg.val_every == 0 or step == cfg.steps):
            vl = val_loss(drafter, data, val, depth, w, amp_dtype)
            val_history.append({"step": step, "val_loss": round(vl, 5), "seconds": round(elapsed, 2)})
            if vl < best["loss"]:
                best = {"loss": vl, "step": step,
                        "state": {k: v.detach().clone() for k, v in drafter.state_dict().items()}}
        bar.update(1)
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < end:
            elapsed += time.perf_counter() - t_last
            t_last = time.perf_counter()
            checkpoint()
    elapsed += time.perf_counter() - t_last
    bar.close()
    checkpoint()
    summary = {"steps": step, "planned_steps": cfg.steps, "batch_positions": cfg.batch_positions, "depth": depth,
               "lr": cfg.lr,
               "train_positions": int(starts.numel()), "final_loss": run_loss, "seconds": round(elapsed, 1)}
    if track and best["state"] is not None and step >= cfg.steps:
        vals = [h["val_loss"] for h in val_history]
        summary.update(val_loss_final=vals[-1] if vals else None, val_loss_best=round(best["loss"], 5),
                       best_step=best["step"], val_positions=int(val.numel()))
        if best["step"] != step:  # keep the weights that generalised best (early stopping)
            drafter.load_state_dict(best["state"])
            log.info("%s: kept the step-%d weights (val %.4f) over the last (val %.4f)", drafter.kind,
                     best["step"], best["loss"], vals[-1])
    drafter.eval()
    drafter.training_summary = dict(drafter.training_summary, **summary)
    return {"summary": summary, "history": history, "val_history": val_history, "config": asdict(cfg)}


# ---- evaluation ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(drafter: Drafter, data: TeacherData, split: str = "eval", depth: int | None = None,
             max_positions: int = 20000, batch_positions: int = 1024, seed: int = 0) -> dict:
    """Top-1/top-5 accuracy per depth and family vs the base's greedy token, and the mean KL."""
    dev = data.device
    depth = min(depth or drafter.trained_depth, drafter.max_depth)
    starts = data.starts.get(split)
    if starts is None or starts.numel() == 0:
        raise ValueError(f"no {split!r} positions in the data")
    if starts.numel() > max_positions:
        g = torch.Generator(device="cpu").manual_seed(seed)
        starts = starts[torch.randperm(starts.numel(), generator=g)[:max_positions].to(dev)]
    nfam = len(FAMILY_IDS) + 1
    top1 = torch.zeros(nfam, depth, dtype=torch.long, device=dev)
    top5 = torch.zeros_like(top1)
    count = torch.zeros_like(top1)
    kl_sum = torch.zeros(depth, dtype=torch.float64, device=dev)
    # greedy answers: the path is the base's own greedy continuation, so the run of consecutive
    # top-1 hits from depth 1 is exactly what a chain draft of this depth gets accepted
    acc_sum = torch.zeros(nfam, 2, dtype=torch.float64, device=dev)   # [family, (top1 chain, top5 tree)]
    acc_n = torch.zeros(nfam, dtype=torch.float64, device=dev)
    amp = dev.type == "cuda" and drafter.param_dtype == torch.float32
    was_training = drafter.training
    drafter.eval()
    for a in range(0, starts.numel(), batch_positions):
        t = starts[a: a + batch_positions]
        h, path, tgt, valid = data.batch(t, depth)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            hh = h.to(drafter.param_dtype) if not amp else h
            student = drafter.path_logits(hh, path)
            fam = data.family[t]
            hits = torch.zeros(t.numel(), depth, 2, dtype=torch.bool, device=dev)
            for d in range(depth):
                ht = data.hidden[tgt[:, d]]
                greedy = torch.nn.functional.linear(ht, drafter.lm_head.to(ht.dtype)).argmax(-1)
                cand = drafter.to_full(student[d].topk(5, dim=-1).indices)
                hit1 = (cand[:, 0] == greedy) & valid[:, d]
                hit5 = (cand == greedy[:, None]).any(-1) & valid[:, d]
                teacher = drafter.project(ht.to(drafter.param_dtype) if not amp else ht)
                kl = soft_kl(student[d], teacher)
                kl_sum[d] += (kl.double() * valid[:, d]).sum()
                for stat, v in ((top1, hit1), (top5, hit5), (count, valid[:, d])):
                    stat[:, d] += torch.bincount(fam, weights=v.float(), minlength=nfam).long()
                hits[:, d, 0], hits[:, d, 1] = hit1, hit5
            full = valid.all(1) & (data.greedy[t] if data.greedy is not None else False)
            if bool(full.any()):
                run = hits[full].long().cumprod(1).sum(1).double()          # [n, 2]
                acc_sum.index_add_(0, fam[full], run)
                acc_n += torch.bincount(fam[full], minlength=nfam).double()
    drafter.train(was_training)
    top1, top5, count = top1.cpu(), top5.cpu(), count.cpu()
    res = {"kind": drafter.kind, "split": split, "positions": int(starts.numel()), "depths": depth,
           "draft_vocab_size": drafter.draft_vocab_size, "families": {}}
    for f in range(nfam):
        if int(count[f].sum()) == 0:
            continue
        name = FAMILY_NAMES.get(f, "other")
        res["families"][name] = {
            "top1": [round(float(top1[f, d]) / max(1, int(count[f, d])), 4) for d in range(depth)],
            "top5": [round(float(top5[f, d]) / max(1, int(count[f, d])), 4) for d in range(depth)],
            "n": [int(count[f, d]) for d in range(depth)],
        }
    tot = count.sum(0).clamp(min=1)
    res["all"] = {"top1": [round(float(x), 4) for x in (top1.sum(0) / tot)],
                  "top5": [round(float(x), 4) for x in (top5.sum(0) / tot)],
                  "n": count.sum(0).tolist()}
    res["kl"] = [round(float(k) / max(1, int(n)), 4) for k, n in zip(kl_sum.cpu(), count.sum(0))]
    acc_sum, acc_n = acc_sum.cpu(), acc_n.cpu()
    for f in range(nfam):
        name = FAMILY_NAMES.get(f, "other")
        if name in res["families"] and acc_n[f] > 0:
            res["families"][name]["accept_chain_top1"] = round(float(acc_sum[f, 0] / acc_n[f]), 4)
            res["families"][name]["accept_tree_top5"] = round(float(acc_sum[f, 1] / acc_n[f]), 4)
    if acc_n.sum() > 0:
        res["all"]["accept_chain_top1"] = round(float(acc_sum[:, 0].sum() / acc_n.sum()), 4)
        res["all"]["accept_tree_top5"] = round(float(acc_sum[:, 1].sum() / acc_n.sum()), 4)
        res["accept_positions"] = int(acc_n.sum())
    res["loss"] = round(sum(res["kl"]) / depth, 5)
    return res


def format_eval(res: dict) -> str:
    """A short text table: rows = family, columns = top1/top5 per depth."""
    D = res["depths"]
    head = f"{res['kind']} (draft vocab {res['draft_vocab_size']}, {res['positions']} positions)"
    cols = "  ".join(f"d{d + 1} top1/top5" for d in range(D))
    lines = [head, f"{'family':<8}  {cols}   accepted/step: chain top1, top5 tree"]
    rows = list(res["families"].items()) + [("all", res["all"])]
    for name, r in rows:
        cells = "  ".join(f"{r['top1'][d]:>6.3f}/{r['top5'][d]:<6.3f}" for d in range(D))
        acc = (f"   {r['accept_chain_top1']:.2f}, {r['accept_tree_top5']:.2f}" if "accept_chain_top1" in r else "")
        lines.append(f"{name:<8}  {cells}{acc}")
    lines.append(f"{'KL':<8}  " + "  ".join(f"{k:>13.3f}" for k in res["kl"]))
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")
