"""SpecWorker: one speculative decode step for the whole running batch.

    choose trees  ->  draft  ->  graft lookup chains  ->  one ragged verify forward  ->  accept  ->  compact KV
    ->  update entropy

Per request the step starts from its pending token (the tree's root, already known to be right)
and the hidden state that produced it. The policy picks a tree from the request's entropy
estimate and task family; the drafter fills every tree in one batched call; where the library
(or --lookup-tokens) asks for it, a prompt-lookup chain copied from the request's own history is
grafted under the root (spec/lookup.py); the target model scores all trees in one forward with a
tree mask per request; verification keeps the longest accepted path plus a bonus token. The
accepted nodes' KV is copied to the front of the slots the tree used (so a sequence's slots stay
in order) and the rest of the tree's slots are freed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.model.runner import ModelRunner
from srt_entmtp.sched.request import Request
from srt_entmtp.spec import entropy as entropy_mod
from srt_entmtp.spec.classify import classify_task
from srt_entmtp.spec.device_step import DeviceSpecStep
from srt_entmtp.spec.entropy import entropy_from_logits
from srt_entmtp.spec.library import TreeLibrary
from srt_entmtp.spec.lookup import LOOKUP_RANK, MAX_LOOKUP_TOKENS, LookupIndex, with_lookup
from srt_entmtp.spec.policy import ConfidencePolicy, EntMTPPolicy, LoadAwarePolicy, StaticPolicy, for_batch
from srt_entmtp.spec.ragged import RaggedTreeBatch
from srt_entmtp.spec.tree import Tree
from srt_entmtp.spec.verify import sample_verify
from srt_entmtp.worker import Worker, same_batch

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
ROOT_ONLY = Tree.from_paths([])
SPEC_STEPS = ("auto", "device", "host")


def default_heads_dir(kind: str) -> Path:
    return PACKAGE / "heads" / kind


def _tree_by_name(libraries: list[TreeLibrary], name: str) -> Tree:
    err = None
    for lib in libraries:
        try:
            return lib.tree_by_name(name)
        except ValueError as e:  # LibraryError names the file and the known trees
            err = e
    raise err


def default_library_paths(kind: str, device: torch.device) -> list[Path]:
    """On CUDA, the drafter's libraries calibrated per batch size (<kind>_gpu_b<B>.json) when
    shipped, used together (LoadAwarePolicy); otherwise the one default_library_path gives."""
    if device.type == "cuda":
        per_batch = sorted((PACKAGE / "spec" / "libraries").glob(f"{kind}_gpu_b*.json"))
        if per_batch:
            return per_batch
    return [default_library_path(kind, device)]


def default_library_path(kind: str, device: torch.device) -> Path:
    """The calibrated library shipped for this drafter and device class, else the generic prior."""
    libs = PACKAGE / "spec" / "libraries"
    hw = "gpu" if device.type == "cuda" else "cpu"
    for name in (f"{kind}_{hw}.json", "default.json"):
        if (libs / name).is_file():
            return libs / name
    raise FileNotFoundError(f"no tree library in {libs}")


def _step_info(tree: Tree, task: str, accepted: int, est: float | None, est_in: float | None,
               nodes: int | None = None, lookup: int = 0) -> dict:
    """One request's info about one step, as StepOutput.spec carries it (metrics, calibration)."""
    return {"tree": tree.name, "task": task, "accepted": accepted, "entropy": est, "entropy_in": est_in,
            "nodes": nodes or tree.num_nodes, "lookup": lookup}


class SpecWorker(Worker):
    def __init__(self, runner: ModelRunner, drafter, library: TreeLibrary | list[TreeLibrary],
                 algorithm: str = "ENTMTP", static_tree: Tree | None = None, capacity: int = 256,
                 confidence_threshold: float = 0.05, lookup_tokens: int | None = None, spec_step: str = "host",
                 max_batch: int = 64, tree_attention: str = "auto"):
        super().__init__(runner)
        self.prompt_entropy = True  # the prompt's last entropy seeds each estimate (seed_estimates)
        self.algorithm = algorithm
        self.drafter = drafter
        # several libraries: one per calibrated batch size, picked each step by the running batch
        self.libraries = sorted(library if isinstance(library, list) else [library], key=lambda lib: lib.batch_size)
        library = self.library = self.libraries[0]  # estimator, lookup and STATIC's default come from here
        for lib in self.libraries[1:]:  # one entropy estimate feeds every library's buckets
            if lib.policy.estimator != library.policy.estimator:
                raise ValueError(f"{lib.source}: policy.estimator {lib.policy.estimator} differs from "
                                 f"{library.source}'s {library.policy.estimator}; libraries used together "
                                 "must share one estimator")
        self.tracker = library.make_tracker(capacity)
        if algorithm == "STATIC":
            self.policy = StaticPolicy(static_tree or library.choose("general", None))
        elif len(self.libraries) == 1:
            self.policy = EntMTPPolicy(library, capacity=capacity)
        else:
            self.policy = LoadAwarePolicy([(lib.batch_size, EntMTPPolicy(lib, capacity=capacity))
                                           for lib in self.libraries])
        # per-request `policy: confidence` prunes the chosen tree after drafting (ConfAdapt)
        self.confidence = ConfidencePolicy(self.policy, confidence_threshold)
        pol = library.policy
        self.lookup_tokens = pol.lookup_tokens if lookup_tokens is None else int(lookup_tokens)
        if not 0 <= self.lookup_tokens <= MAX_LOOKUP_TOKENS:
            raise ValueError(f"lookup tokens must be in [0, {MAX_LOOKUP_TOKENS}], got {self.lookup_tokens}")
        self.lookup_min_match = pol.lookup_min_match
        # per library, families whose every bucket holds a root-only tree (calibrated where drafting
        # does not pay): their requests skip the policy and take plain decode steps
        self._never_drafts_by_batch = [(lib.batch_size, {} if algorithm == "STATIC" or self.lookup_tokens else {
            name: fam.tree_for_bucket(0) for name, fam in lib.families.items()
            if all(fam.tree_for_bucket(b).num_nodes == 1 for b in range(fam.num_buckets))}) for lib in self.libraries]
        self._free_slots = list(range(capacity - 1, -1, -1))
        self.max_nodes = max([lib.max_tree_nodes for lib in self.libraries]
                             + [static_tree.num_nodes if static_tree else 1]) + self.lookup_tokens
        self.step_info: dict[str, dict] = {}
        # greedy steps without lookup chains can run as one fixed-shape device step (device_step.py)
        if spec_step not in SPEC_STEPS:
            raise ValueError(f"spec step must be one of {', '.join(SPEC_STEPS)}, got {spec_step!r}")
        if spec_step == "auto":
            spec_step = "device" if runner.device.type == "cuda" else "host"
        self.device_step = None
        self._deferred = None  # (requests, entropies, accept counts) of the last device step, not yet in the estimates
        self._ahead = None     # (rids, slots, estimate, trees) chosen for the next step of that batch
        self._inflight = None  # the device step launched and not yet collected (see _decode_device)
        self._drafted_ahead = None  # the drafts of the next step of the batch in flight (DraftedStep)
        self.draft_ahead = True     # False: draft each step only once the one before is collected (an A/B switch)
        # True: a batch that changed is launched behind its step in flight (join ahead's second half;
        # EngineArgs.join_ahead, off by default: experimental, wrong tokens on the H100 until fenced, docs/gpu.md)
        self.launch_changed = False
        if spec_step == "device":
            extra = [static_tree] if static_tree else []
            trees = [t for lib in self.libraries for t in lib.all_trees()] + extra
            # a lone request's tree comes from the library for batch 1 (the smallest batch_size)
            lone = list(self.libraries[0].all_trees()) + extra
            self.device_step = DeviceSpecStep(runner, drafter, trees, capacity, max_batch, tree_attention,
                                              lone_trees=lone)
            # each request takes a whole layout's slots for the step
            self.max_nodes = max([self.max_nodes] + [sh.layout.num_slots for sh in self.device_step.shapes])

    @classmethod
    def create(cls, runner: ModelRunner, algorithm: str, drafter: str, heads_path: str | None = None,
               library_path: str | None = None, static_tree: str | None = None,
               capacity: int = 256, draft_dtype: str = "auto", lookup_tokens: int | None = None,
               spec_step: str = "auto", max_batch: int = 64, tree_attention: str = "auto") -> SpecWorker:
        from srt_entmtp.spec.drafters import load_drafter

        heads = Path(heads_path) if heads_path else default_heads_dir(drafter)
        d = load_drafter(heads, runner)  # the runner carries the model's name for the heads' check
        int8 = d.quantize_for_inference(draft_dtype)
        lib_files = ([Path(p) for p in str(library_path).split(",")] if library_path
                     else default_library_paths(drafter, runner.device))
        libraries = [TreeLibrary.load(f, expect_drafter=drafter) for f in lib_files]
        lib_file = ", ".join(f"{f} (batch {lib.batch_size})" if len(lib_files) > 1 else str(f)
                             for f, lib in zip(lib_files, libraries))
        tree = None
        if static_tree:
            tree = _tree_by_name(libraries, static_tree)
        w = cls(runner, d, libraries, algorithm=algorithm, static_tree=tree, capacity=capacity,
                lookup_tokens=lookup_tokens, spec_step=spec_step, max_batch=max_batch, tree_attention=tree_attention)
        n_trees = len({t for lib in libraries for t in lib.all_trees()})
        log.info("speculation: %s, %s drafter from %s (%s weights), tree library %s (%d trees), prompt lookup %s, "
                 "%s", algorithm, drafter, heads, "int8" if int8 else str(d.param_dtype).replace("torch.", ""),
                 lib_file, n_trees, f"up to {w.lookup_tokens} tokens" if w.lookup_tokens else "off",
                 "greedy steps on the device (layouts %s)" % (", ".join(map(str, w.device_step.layouts)) or "none")
                 if w.device_step else "steps on the host")
        return w

    # ---- request lifecycle -------------------------------------------------------------------
    def max_new_slots_per_step(self) -> int:
        return self.max_nodes

    def on_admit(self, req: Request) -> None:
        req.slot = self._free_slots.pop()
        slot = torch.tensor([req.slot])
        self.tracker.reset(slot)
        self.policy.reset(slot)
        req.lookup = LookupIndex(self.lookup_min_match) if self.lookup_tokens else None
        if req.spec.task is None:
            req.task = classify_task(req.prompt_text) if req.prompt_text else "general"

    def on_finish(self, req: Request) -> None:
        super().on_finish(req)
        if self._inflight is not None:  # its part of the step in flight is wasted: free its tree now
            sl = self._inflight["slots"].pop(id(req), None)
            if sl is not None:  # the device writes these slots before any later use of them (one stream)
                self.kv.free(sl)
        if req.slot >= 0:
            self._free_slots.append(req.slot)
            req.slot = -1

    def can_join(self, reqs: list[Request], chunk_lens: list[int]) -> bool:
        """Device steps draft from pools on the device, so a greedy request whose prompt completes
        in this chunk may decode before its first token is read; not with prompt-lookup chains
        (drafted on the host from the tokens) or `policy: confidence` (pruned on the host)."""
        return self.device_step is not None and not self.lookup_tokens and all(
            r.sampling.greedy and r.spec.policy != "confidence" and r.num_prefilled + n == len(r.prompt_ids)
            for r, n in zip(reqs, chunk_lens))

    def pool_prompts(self, reqs: list[Request], hidden: torch.Tensor, first: torch.Tensor) -> None:
        """A joining request's first draft starts from its prompt's hidden state and first token."""
        ds = self.device_step
        rows = torch.tensor([r.slot for r in reqs])
        if ds.dev.type == "cuda":  # no sync: pinned, queued behind the chunk
            rows = rows.pin_memory().to(ds.dev, non_blocking=True)
        ds.hidden.index_copy_(0, rows, hidden.to(ds.hidden.dtype))
        ds.roots.index_copy_(0, rows, first)

    def seed_estimates(self, reqs: list[Request], entropy: torch.Tensor) -> None:
        """The prompt's last next-token entropy seeds each estimate."""
        slots = torch.tensor([r.slot for r in reqs])
        self.tracker.update(slots, entropy, torch.arange(len(reqs) + 1))

    def tree_by_name(self, name: str) -> Tree:
        """A tree by entry name or Tree.name from any of the worker's libraries."""
        return _tree_by_name(self.libraries, name)

    def tree_names(self) -> list[str]:
        return sorted({e.name for lib in self.libraries for f in lib.families.values() for e in f.trees})

    def _never_drafts_for(self, batch: int) -> dict[str, Tree]:
        return for_batch(self._never_drafts_by_batch, batch)

    # ---- one decode step ------------------------------------------------------------------------
    def _never_draft(self, reqs: list[Request]) -> dict[str, Tree] | None:
        """The batch library's root-only tree per family if no request of this batch can ever
        draft (each is in a family whose library trees are all root-only, with no per-request
        tree or policy that drafts, and none samples with its own seed: those stay on one path,
        so their random stream never depends on it); else None."""
        never = self._never_drafts_for(len(reqs))
        return never if never and all(r.task in never and not r.spec.tree and r.spec.policy in (None, "entmtp", "none")
                                      and (r.generator is None or r.sampling.greedy) for r in reqs) else None

    def _choose_now(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor, list[Tree]]:
        """(slots, estimate, trees) for these requests' next step, from the estimates as they stand
        once the last device step's entropies are folded in (the policy steps once per call)."""
        self._fold_deferred()
        slots = torch.tensor([r.slot for r in reqs])
        entropy = self.tracker.value(slots)
        return slots, entropy, self._trees(reqs, slots, entropy)

    def _trees(self, reqs: list[Request], slots: torch.Tensor, entropy: torch.Tensor) -> list[Tree]:
        chosen = self.policy.choose(slots, [r.task for r in reqs], entropy)
        trees = []
        for r, t in zip(reqs, chosen):
            if r.spec.policy == "none":
                t = ROOT_ONLY
            elif r.spec.tree:
                t = self.tree_by_name(r.spec.tree)
            if t.depth > self.drafter.max_depth:
                t = t.truncate(self.drafter.max_depth)
            trees.append(t)
        return trees

    def decode(self, reqs: list[Request]) -> dict[str, list[int]]:
        if self._inflight is not None:  # launched by the last call, before its tokens went back
            return self._collect_device(reqs)
        if self._plain_inflight is not None:  # a pipelined plain step of a batch that never drafts
            return self._record_never_drafting(self._plain_inflight.reqs, self._plain_collect(reqs))
        joining = any(r.joining for r in reqs)
        ahead = self._take_chosen_ahead(reqs)
        if ahead is not None:  # chosen while this batch's last device step ran
            slots, entropy, trees = ahead
        else:
            self._fold_deferred()
            never = self._never_draft(reqs)
            if never is not None and joining:
                return self._without_joining(reqs)
            if never is not None:  # no estimate, no policy: nothing would read them; a plain step
                return self._record_never_drafting(reqs, self.plain_decode(reqs))
            slots, entropy, trees = self._choose_now(reqs)
        dev = self.runner.device
        chains = self._lookup_chains(reqs) if self.lookup_tokens else None
        if self.device_step is not None and not (chains and any(chains)) and all(
                r.sampling.greedy and r.spec.policy != "confidence" for r in reqs):
            li = self._device_layout(trees)
            if li is not None:
                return self._decode_device(li, reqs, trees, slots, entropy)
        if joining:
            return self._without_joining(reqs)
        self._fold_deferred()  # every other path reads or updates the estimates now
        if all(t.num_nodes == 1 for t in trees) and not (chains and any(chains)) and not any(
                r.generator is not None and not r.sampling.greedy for r in reqs):
            return self._decode_root_only(reqs, trees, slots, entropy)
        prefix = [r.num_kv for r in reqs]
        batch = RaggedTreeBatch.build(trees, torch.tensor(prefix), device=dev)
        hidden = torch.stack([r.last_hidden for r in reqs])
        roots = torch.tensor([r.pending_token for r in reqs], device=dev)
        draft = self.drafter.propose(hidden, roots, batch)
        node_tokens = draft.node_tokens
        if any(r.spec.policy == "confidence" for r in reqs):
            trees, batch, node_tokens = self._prune(reqs, trees, prefix, batch, draft, dev)
        heads = trees  # the heads' trees as verified (pruned where asked); metrics count these
        if chains and any(chains):
            trees, batch, node_tokens = self._graft(trees, prefix, batch, node_tokens, chains, dev)

        # one forward over every request's tree, each under its own tree mask
        counts = batch.node_counts
        new_slots = self.kv.alloc_many(counts)
        tokens = list(node_tokens.split(counts))
        positions = list(batch.positions.split(counts))
        fb = ForwardBatch.build(tokens, [r.kv_slots for r in reqs], new_slots, positions=positions,
                                custom_masks=[t.mask for t in trees], device=dev)
        out = self.runner.forward(fb)

        accept, accepted_flat, indptr, emitted = self._verify(reqs, trees, prefix, batch, node_tokens, out.logits)

        # keep the accepted path's KV at the front of the tree's slots, free the rest
        flat_slots = torch.cat(new_slots)
        src = flat_slots[accepted_flat.cpu()]
        dst = torch.cat([s[:a + 1] for s, a in zip(new_slots, accept)])
        moved = src != dst
        if bool(moved.any()):
            self.kv.copy_slots(src[moved], dst[moved])
        self.kv.free(torch.cat([s[a + 1:] for s, a in zip(new_slots, accept)]))

        # entropy of the target at each accepted position feeds the estimate
        ent = entropy_from_logits(out.logits[accepted_flat])
        self.tracker.update(slots, ent.cpu(), indptr.cpu())
        leaves = accepted_flat[indptr[1:] - 1]  # each request's deepest accepted node (flat id)
        last_hidden = out.hidden[leaves]  # a copy: out may be a graph's static buffer
        est = self.tracker.value(slots).tolist()
        est_in = entropy.tolist()  # the estimate the policy saw (calibration checks predictions per bucket)
        self.step_info = {}
        results = {}
        grafted = chains is not None and any(chains)
        if grafted:  # was each request's deepest accepted node on its lookup chain?
            leaf = leaves.tolist()
            starts = batch.node_indptr.tolist()
        for i, r in enumerate(reqs):
            r.append_kv(new_slots[i][:accept[i] + 1])
            r.last_hidden = last_hidden[i]
            # the deepest accepted node hangs on the lookup chain: the whole accepted path came from it
            by_lookup = grafted and trees[i].paths[leaf[i] - starts[i]][-1:] == (LOOKUP_RANK,)
            r.lookup_accepted += accept[i] if by_lookup else 0
            self._record(r, heads[i], accept[i], est[i], est_in[i], nodes=trees[i].num_nodes,
                         lookup=len(chains[i]) if chains else 0)
            results[r.rid] = emitted[i]
        return results

    def _without_joining(self, reqs: list[Request]) -> dict[str, list[int]]:
        """This step cannot start from the device's pools (no request drafts, or another path):
        joining requests sit it out, and take the next one once their first tokens are read."""
        rest = [r for r in reqs if not r.joining]
        return self.decode(rest) if rest else {}

    def _decode_device(self, li: int, reqs: list[Request], trees: list[Tree], slots: torch.Tensor,
                       entropy: torch.Tensor) -> dict[str, list[int]]:
        """A greedy step as one fixed-shape device step (device_step.py), pipelined one step deep.

        The host works while the device runs a step:
          * it folds the previous step's entropies into the estimates and chooses this batch's
            trees for the next step from them, so the estimate a device step's policy sees is one
            step behind (it lacks the step just verified); then it launches the next step's
            drafts, which read only what this step writes on the device (hidden states and bonus
            tokens), so the GPU drafts while the host collects this step;
          * once a step is collected and its KV kept, the next step of the same batch is launched
            before the tokens go back to the scheduler (`_collect_device`): stop checks, streaming
            and metrics then run while the GPU works. A request that stops meanwhile wastes its
            part of that step (its tree slots are freed at once, `on_finish`); a batch that
            changed (a request finished, or new ones admitted) has its first step launched there
            too, once the step before is read (`_relaunch_changed`).
        On the H200 host this work (~1 ms a step at batch 1) was otherwise spent with the GPU idle."""
        self._launch_device(li, reqs, trees, slots, entropy)
        return self._collect_device(reqs)

    def _launch_device(self, li, reqs, trees, slots, entropy, drafted=None, after=None) -> None:
        """Launch a step (its drafts already launched ahead, or drafted now; after: the step before
        it, still unread), then, while it runs, fold the last step's entropies, choose the next
        step's trees and launch their drafts."""
        ds = self.device_step
        step = ds.launch_verify(drafted if drafted is not None else ds.launch_draft(li, reqs, trees), after=after)
        self._inflight = {"step": step, "reqs": reqs, "trees": trees, "entropy_in": entropy,
                          "slots": dict(zip(map(id, reqs), step.slots.reshape(len(reqs), -1)))}
        self._fold_deferred()
        est = self.tracker.value(slots)
        self._inflight["est"] = est
        nxt = self._trees(reqs, slots, est)
        self._ahead = (tuple(r.rid for r in reqs), slots, est, nxt)
        self._drafted_ahead = None
        li2 = self._device_layout(nxt) if self.pipeline is not False and self.draft_ahead else None
        if li2 is not None:  # the GPU drafts the next step while the host collects this one
            self._drafted_ahead = ds.launch_draft(li2, reqs, nxt, pooled=True)

    def _collect_device(self, reqs: list[Request]) -> dict[str, list[int]]:
        """Wait for the step in flight; keep each live request's accepted slots and free the rest
        of its tree's; relaunch the same batch if it is unchanged; return the step's tokens.
        Where it can (`_launch_after`), the next step is launched before this one is read."""
        f, self._inflight = self._inflight, None
        nxt = self._launch_after(f, reqs)
        out = self.device_step.collect(f["step"])
        alive = [i for i, r in enumerate(f["reqs"]) if r.slot >= 0]  # else finished meanwhile: on_finish freed its tree
        if alive:
            # each live request keeps its tree's first accept+1 slots (the accepted path, compacted
            # there by the verify graph); the rest go back in one free (numpy: no per-request torch ops)
            accept = np.asarray(out.accept)[alive]
            tree_slots = out.slots[alive]
            kept = np.arange(tree_slots.shape[1]) <= accept[:, None]
            for r_i, row, a in zip(alive, tree_slots, accept.tolist()):
                f["reqs"][r_i].append_kv(row[:a + 1])
            self.kv.free(tree_slots[~kept])
        self._deferred = (f["reqs"], out.entropy, out.accept)
        if nxt is not None:  # launched before this step was read; its drafts of the step after too
            self._inflight = nxt
        elif self.pipeline is not False and len(alive) == len(f["reqs"]) and same_batch(f["reqs"], reqs):
            self._relaunch(reqs)  # before the records: the GPU waits on it
        else:
            self._drafted_ahead = None  # drafts of a batch that changed are not verified
            if self.pipeline is not False and self.relaunch_changed:
                self._relaunch_changed(f, reqs)
        est, est_in = f["est"].tolist(), f["entropy_in"].tolist()
        self.step_info = {}
        results = {}
        for i in alive:
            r = f["reqs"][i]
            self._record(r, f["trees"][i], out.accept[i], est[i], est_in[i])
            results[r.rid] = out.tokens[i]
        return results

    def _launch_after(self, f: dict, reqs: list[Request]):
        """Launch the next step of an unchanged batch before step f is read, from the drafts
        launched behind it: its prefix lengths come from the device (DeviceSpecStep.launch_verify
        after=...), so the GPU runs it straight after f while the host reads f. The estimates its
        successor's trees are chosen from then lag two steps. A batch that changed since f goes
        the same way where it can (`_launch_changed_after`). Returns the new in-flight step, or
        None (then f is read first and the batch relaunched as before, `_relaunch`)."""
        if self.launch_ahead is False or self.pipeline is False:
            return None
        if not same_batch(f["reqs"], reqs):
            return self._launch_changed_after(f, reqs)
        drafted = self._drafted_ahead
        if drafted is None or not same_batch(drafted.reqs, reqs):
            return None
        ds = self.device_step
        if self.kv.num_free < len(reqs) * ds.shapes[drafted.li].layout.num_slots \
                or not ds.can_launch_after(drafted.li, reqs, f["step"]):
            return None
        ahead = self._take_chosen_ahead(reqs)
        if ahead is None:
            return None
        self._drafted_ahead = None
        slots, entropy, trees = ahead
        self._launch_device(drafted.li, reqs, trees, slots, entropy, drafted, after=f["step"])
        nxt, self._inflight = self._inflight, None
        return nxt

    def _launch_changed_after(self, f: dict, reqs: list[Request]):
        """The next step of a batch that changed since step f, launched before f is read: requests
        finished (their part of f is wasted), and joining ones came in, their prompt chunks queued
        behind f. Every request must draft from the pools: each either ran in f, whose verify
        writes its root, hidden state and kept count, or is joining, whose chunk wrote them. The
        drafts launched behind f were for f's batch; these are drafted again (the same pools)."""
        if self.launch_changed is False or not self.device_step.graphs:  # (eager steps never launch after)
            return None
        in_f = {id(r) for r in f["reqs"]}
        if not reqs or not all(r.joining or id(r) in in_f for r in reqs):
            return None
        slots, entropy, trees = self._choose_now(reqs)
        li = self._device_layout(trees)
        ds = self.device_step
        if li is None or self.kv.num_free < len(reqs) * ds.shapes[li].layout.num_slots \
                or not ds.can_launch_after(li, reqs, f["step"]):
            return None
        self._drafted_ahead = None
        self._launch_device(li, reqs, trees, slots, entropy, ds.launch_draft(li, reqs, trees, pooled=True),
                            after=f["step"])
        nxt, self._inflight = self._inflight, None
        return nxt

    def _relaunch(self, reqs: list[Request]) -> None:
        """Verify the next step of an unchanged batch, whose drafts were launched ahead (they
        start from the pools the step just collected wrote: its hidden states and bonus tokens)."""
        drafted, self._drafted_ahead = self._drafted_ahead, None
        ahead = self._take_chosen_ahead(reqs)
        if ahead is None:
            return
        slots, entropy, trees = ahead
        if drafted is None:  # not drafted ahead (draft_ahead off)
            li = self._device_layout(trees)
            if li is not None:
                drafted = self.device_step.launch_draft(li, reqs, trees, pooled=True)  # roots: the step just collected
        if drafted is None:  # root-only trees, or no layout: the next call takes another path with these trees
            self._ahead = (tuple(r.rid for r in reqs), *ahead)
            return
        self._launch_device(drafted.li, reqs, trees, slots, entropy, drafted)

    def _relaunch_changed(self, f: dict, reqs: list[Request]) -> None:
        """Launch the first step of a batch that changed since step f (requests finished, or were
        admitted and their first tokens read) as soon as f is read, before its tokens go back to the
        scheduler, as `_relaunch` does for an unchanged batch: else the GPU waits through the
        scheduler's bookkeeping and the next call's set-up, at every admission and finish. The trees
        are the ones the next call would choose (f's entropies folded in first); requests that ran in
        f draft from the pools f wrote (their bonus token is not on the host yet), new ones from
        their first token. Where no layout drafts them, the next call takes the chosen trees."""
        if not reqs or self.lookup_tokens or any(r.joining or r.slot < 0 for r in reqs) \
                or not all(r.sampling.greedy and r.spec.policy != "confidence" for r in reqs) \
                or self._never_draft(reqs) is not None:
            return
        slots, entropy, trees = self._choose_now(reqs)
        li = self._device_layout(trees)
        if li is None:  # the next call takes another path with these trees (the policy steps once)
            self._ahead = (tuple(r.rid for r in reqs), slots, entropy, trees)
            return
        ran = {id(r) for r in f["reqs"]}
        drafted = self.device_step.launch_draft(li, reqs, trees, pooled=[id(r) in ran for r in reqs])
        self._launch_device(li, reqs, trees, slots, entropy, drafted)

    def _relaunches_plain(self, reqs: list[Request]) -> bool:
        """A changed batch's next plain step is launched early only if that batch never drafts."""
        return self._never_draft(reqs) is not None

    def _device_layout(self, trees: list[Tree]) -> int | None:
        """The device step's layout for these trees (one per request), or None: no tree drafts,
        or no layout holds them all (the host path, or a plain step, takes the batch)."""
        if not any(t.num_nodes > 1 for t in trees):
            return None
        return self.device_step.pick(trees, len(trees))

    def _take_chosen_ahead(self, reqs: list[Request]):
        """(slots, estimate, trees) chosen for exactly this batch during its last device step, or None."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and len(ahead[0]) == len(reqs) and ahead[0] == tuple(r.rid for r in reqs):
            return ahead[1:]
        return None

    def _fold_deferred(self) -> None:
        """Fold the last device step's entropies into the estimates of requests still running
        (a finished request's slot may already belong to a new one)."""
        if self._deferred is None:
            return
        reqs, ents, accept = self._deferred
        self._deferred = None
        live = [i for i, r in enumerate(reqs) if r.slot >= 0]
        if not live:
            return
        if len(live) <= entropy_mod.SMALL_BATCH:  # a few requests: lists, not numpy calls on a few values each
            ind, flat = [0], []
            for i in live:
                flat += ents[i, : accept[i] + 1].tolist()
                ind.append(len(flat))
            self.tracker.update([reqs[i].slot for i in live], flat, ind)
            return
        n_new = np.asarray(accept, dtype=np.int64)[live] + 1  # entropies at the accepted path and the bonus token
        indptr = np.zeros(len(live) + 1, dtype=np.int64)
        np.cumsum(n_new, out=indptr[1:])
        rows = ents[live]
        flat = rows[np.arange(rows.shape[1]) < n_new[:, None]]  # row-major: each request's in order
        self.tracker.update(np.array([reqs[i].slot for i in live], dtype=np.int64), flat, indptr)

    def _lookup_chains(self, reqs: list[Request]) -> list[list[int]]:
        """Each request's prompt-lookup proposal (empty: no earlier occurrence, or `policy: none`)."""
        out = []
        for r in reqs:
            if r.lookup is None or r.spec.policy == "none":
                out.append([])
                continue
            r.lookup.sync(r.prompt_ids, r.output_ids)
            out.append(r.lookup.propose(self.lookup_tokens))
        return out

    def _graft(self, trees, prefix, batch, node_tokens, chains, dev):
        """Hang each request's lookup chain under its root: the new trees, their batch, and the
        node tokens in the new trees' canonical order."""
        starts = batch.node_indptr.tolist()
        grafted, parts = [], []
        for i, (t, c) in enumerate(zip(trees, chains)):
            own = node_tokens[starts[i]:starts[i + 1]]
            if c:
                t, gather = with_lookup(t, len(c))
                own = torch.cat([own, torch.tensor(c, dtype=own.dtype, device=dev)])[gather.to(dev)]
            grafted.append(t)
            parts.append(own)
        return grafted, RaggedTreeBatch.build(grafted, torch.tensor(prefix), device=dev), torch.cat(parts)

    def _record(self, r: Request, tree: Tree, accepted: int, est: float | None, est_in: float | None,
                nodes: int | None = None, lookup: int = 0, info: dict | None = None) -> None:
        """A request's counters and this step's info (metrics, calibration) after one step.
        `tree` is the heads' tree (the policy's choice, pruned where asked); `nodes` what was
        verified, with a lookup chain of `lookup` tokens grafted on. est None: no estimate was
        kept this step (a batch that can never draft). `info`: this step's info dict, if the
        caller shares one between requests (it is read-only downstream)."""
        r.verify_ct += 1
        r.accepted_tokens += accepted
        r.tree_counts[tree.name] = r.tree_counts.get(tree.name, 0) + 1
        if est is not None:
            r.entropy_sum += est
            r.entropy_n += 1
        self.step_info[r.rid] = info if info is not None else _step_info(tree, r.task, accepted, est, est_in,
                                                                          nodes, lookup)

    def _record_never_drafting(self, reqs: list[Request], results: dict[str, list[int]]) -> dict[str, list[int]]:
        """Counters and step info of a plain step of a batch that can never draft (`_never_draft`):
        no estimate is kept, since nothing would read it, so it costs what a NONE step costs. The
        requests of one (tree, task) share one info dict: a step at batch 64 is host-bound, and
        this loop is all such a step adds to NONE's."""
        never = self._never_drafts_for(len(reqs))
        self.step_info = {}
        shared: dict[tuple[str, str], dict] = {}
        for r in reqs:
            if r.rid not in results:
                continue
            tree = ROOT_ONLY if r.spec.policy == "none" else never.get(r.task, ROOT_ONLY)
            key = (tree.name, r.task)
            if key not in shared:
                shared[key] = _step_info(tree, r.task, 0, None, None)
            self._record(r, tree, 0, None, None, info=shared[key])
        return results

    def _decode_root_only(self, reqs, trees, slots=None, entropy=None):
        """No request drafts this step (the library chose root-only trees, or `policy: none`):
        a plain decode step (the decode CUDA graph on GPU), the same tokens as a root-only tree
        verify, keeping the estimate and the hidden state. Seeded sampling requests never come
        here, since their random stream must not depend on which path their batch took. A batch
        that can never draft takes `_record_never_drafting` instead: no estimate and no hidden
        state (`mean_entropy` stays null). (Only with libraries per batch size can such a request
        draft later, when its batch shrinks: its first drafted step then drafts from a stale
        hidden state, which costs acceptance in that step, never correctness, since every draft
        is verified.)"""
        results, out = self.plain_step(reqs)
        est = est_in = [None] * len(reqs)
        if slots is not None:
            self.tracker.update(slots, entropy_from_logits(out.logits).cpu(), torch.arange(len(reqs) + 1))
            est, est_in = self.tracker.value(slots).tolist(), entropy.tolist()
            hidden = out.hidden.clone()  # out may be a graph's static buffer
            for i, r in enumerate(reqs):
                r.last_hidden = hidden[i]
        self.step_info = {}
        for i, r in enumerate(reqs):
            self._record(r, trees[i], 0, est[i], est_in[i])
        return results

    def _prune(self, reqs, trees, prefix, batch, draft, dev):
        """Drop drafted nodes whose path confidence is under the threshold (requests asking for it)."""
        starts = batch.node_indptr.tolist()
        rows, pruned = [], []
        for i, (r, t) in enumerate(zip(reqs, trees)):
            idx = torch.arange(starts[i], starts[i + 1], device=dev)
            if r.spec.policy == "confidence":
                t, keep = self.confidence.prune_with_index(t, draft.path_conf[idx])
                idx = idx[keep.to(dev)]
            pruned.append(t)
            rows.append(idx)
        rows = torch.cat(rows)
        return pruned, RaggedTreeBatch.build(pruned, torch.tensor(prefix), device=dev), draft.node_tokens[rows]

    def _verify(self, reqs, trees, prefix, batch, node_tokens, logits):
        """Verify every tree; returns (accept counts, accepted flat node ids, their indptr, emitted
        tokens per request). Unseeded requests share one draw; each seeded sampling request is
        verified on its own with its own generator, so its output does not depend on its batch."""
        dev = logits.device
        groups, shared = [], []
        for i, r in enumerate(reqs):
            (groups.append([i]) if r.generator is not None and not r.sampling.greedy else shared.append(i))
        if shared:
            groups.insert(0, shared)
        starts = batch.node_indptr.tolist()
        accept = [0] * len(reqs)
        emitted: list[list[int]] = [[] for _ in reqs]
        flat_parts: list[torch.Tensor | None] = [None] * len(reqs)
        for g in groups:
            if len(groups) == 1:
                sub, rows = batch, None
            else:
                sub = RaggedTreeBatch.build([trees[i] for i in g], torch.tensor([prefix[i] for i in g]), device=dev)
                rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=dev) for i in g])
            sp = [reqs[i].sampling for i in g]
            res = sample_verify(sub, node_tokens if rows is None else node_tokens[rows],
                                logits if rows is None else logits[rows],
                                temperature=torch.tensor([p.temperature for p in sp], device=dev),
                                top_p=torch.tensor([p.top_p for p in sp], device=dev),
                                top_k=torch.tensor([p.top_k for p in sp], device=dev),
                                generator=reqs[g[0]].generator if len(g) == 1 else None)
            ptr = res.accepted_indptr.tolist()
            flat = res.accepted_flat if rows is None else rows[res.accepted_flat]
            for j, i in enumerate(g):
                accept[i] = int(res.accept_len[j])
                flat_parts[i] = flat[ptr[j]:ptr[j + 1]]
            for j, toks in enumerate(res.accepted_tokens):
                emitted[g[j]] = toks
        accepted_flat = torch.cat(flat_parts)
        indptr = torch.zeros(len(reqs) + 1, dtype=torch.long)
        indptr[1:] = torch.tensor([a + 1 for a in accept]).cumsum(0)
        return accept, accepted_flat, indptr, emitted
