"""Speculative decoding on the real model against plain decoding of the same engine.

Temperature 0: ENTMTP / STATIC output equals NONE token for token, with requests of all four
task families batched together so one verify pass mixes different trees. Sampling: the
distribution of tokens emitted by tree verification equals that of plain sampling
(two-sample chi-square), and a seeded request is reproducible.
"""
from __future__ import annotations

import collections
import importlib.util

import pytest

from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams, SpecOptions
from srt_entmtp.spec.worker import ROOT_ONLY, default_heads_dir
from tests.conftest import load_prompts
from tests.device_step_helpers import install_graph_stand_ins, record_changed_launches

N_TOKENS = 24
PRIOR_LIBRARY = default_heads_dir("medusa").parents[1] / "spec" / "libraries" / "default.json"


@pytest.fixture(scope="module")
def prompts(runner, tokenizer):
    from srt_entmtp.model.tokenizer import encode_chat

    rows = load_prompts(per_family=3, seed=1)  # 15 prompts: code, math, chat x2 sets, writing
    return rows, [encode_chat(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows]


@pytest.fixture(scope="module")
def reference(runner, prompts):
    eng = Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=8192, context_length=2048,
                            max_running_requests=16))
    out = eng.generate(prompts[1], SamplingParams(max_new_tokens=N_TOKENS, ignore_eos=True))
    return [r.output_ids for r in out]


def _spec_engine(runner, algorithm, drafter, **kw):
    args = {"kv_slots": 8192, "context_length": 2048, "max_running_requests": 16} | kw
    return Engine(EngineArgs(model_path=str(runner.model_dir), speculative_algorithm=algorithm, drafter=drafter,
                             **args))


@pytest.mark.parametrize("drafter", ["medusa", "hydra", "mtp"])
def test_entmtp_greedy_equals_plain_decoding_with_mixed_trees(runner, prompts, reference, drafter):
    rows, ids = prompts
    # the prior library has several trees per family; a calibrated one may hold a single tree
    # for every family (docs/calibration.md), and this test is about mixing trees in one step
    eng = _spec_engine(runner, "ENTMTP", drafter, tree_library=str(PRIOR_LIBRARY))
    out = _generate_mixed_trees_as_plain(eng, rows, ids, reference, drafter)
    assert sum(o.meta_info()["spec_verify_ct"] for o in out) > 0


def _generate_mixed_trees_as_plain(eng, rows, ids, reference, label):
    """Generate every prompt with its task's trees in one batch; assert each output equals plain
    decoding, some step mixed different trees, and no KV slot leaked. Returns the requests."""
    free0 = eng.runner.kv.num_free
    trees_per_step = []
    eng.step_listeners.append(lambda outs, dt: trees_per_step.append({o.spec["tree"] for o in outs if o.spec}))
    out = eng.generate(ids, SamplingParams(max_new_tokens=N_TOKENS, ignore_eos=True),
                       [SpecOptions(task=r["task"]) for r in rows])
    for r, o, row in zip(reference, out, rows):
        assert o.output_ids == r, f"{label}: {row['task']} prompt {row['id']} diverged from plain decoding"
    assert max(len(s) for s in trees_per_step) > 1, "no verify step mixed different trees"
    assert eng.runner.kv.num_free == free0, "tree slots leaked"
    return out


@pytest.mark.parametrize("drafter, draft_ahead", [("medusa", True), ("mtp", True), ("mtp", False)])
def test_device_step_equals_plain_decoding_with_mixed_trees_and_padding(runner, prompts, reference, drafter,
                                                                        draft_ahead):
    """The fixed-shape device step (the default on CUDA, two graphs per shape there; eager here),
    with every batch padded to its bucket as graphs pad it, so padding requests run too; with
    the next step's drafts launched before the step in flight is collected, and without."""
    rows, ids = prompts
    eng = _spec_engine(runner, "ENTMTP", drafter, tree_library=str(PRIOR_LIBRARY), spec_step="device",
                       lookup_tokens=0)
    eng.worker.draft_ahead = draft_ahead
    step = eng.worker.device_step
    assert step is not None and len(step.layouts) > 1
    step.pad_eager = True
    ahead = []  # per draft launched: was a step in flight (not yet collected) then?
    launch = step.launch_draft
    step.launch_draft = lambda *a, **kw: ahead.append(eng.worker._inflight is not None) or launch(*a, **kw)
    out = _generate_mixed_trees_as_plain(eng, rows, ids, reference, f"{drafter} device step")
    if draft_ahead:
        assert sum(ahead) > len(ahead) / 2, "most steps should be drafted ahead of the step before them"
    else:
        assert ahead and not any(ahead)
    # every decode step ran on the device (the prior library's trees all draft); the step launched
    # ahead of a batch that then changed is wasted, at most one per request that finished
    steps = max(o.verify_ct for o in out)
    assert 0 < steps <= step.steps <= steps + len(out), "not every step ran on the device"
    assert sum(o.accepted_tokens for o in out) > 0


@pytest.mark.slow  # ~4 minutes in Triton's interpreter on this 2-core CPU; the GPU tests run the kernel for real
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_device_step_with_triton_tree_attention_equals_plain_decoding_graph_replay_mocked(runner, prompts, reference,
                                                                                        monkeypatch):
    """The verify graphs' Triton tree attention (model/attention/tree_triton.py), planned and fed
    as in a graph replay: every (layout, bucket) gets a TreeAttention and a stand-in for its CUDA
    graph (no CUDA here) whose replay runs the step's body eagerly, so the kernel (Triton's
    interpreter) sees the staged indices, the gathered ancestor bits and the padding requests;
    and, as with real graphs, steps launched before the step before them is read, also when the
    batch changed since: requests finished (at different lengths; a batch of three pads to the
    bucket of four), and one joined ahead (join_ahead on, off by default: four at a time, the fifth
    admitted once the first is done, its prefix its prompt, among requests of the unread step)."""
    from srt_entmtp.model.attention import tree_triton

    rows, ids = prompts
    # two key splits, not eight: the interpreter runs every program one after another (8 splits made
    # this test 5 minutes); split and merge are still both taken (test_tree_triton.py covers 8)
    monkeypatch.setattr(tree_triton, "MAX_SPLITS", 2)
    eng = _spec_engine(runner, "ENTMTP", "mtp", tree_library=str(PRIOR_LIBRARY), spec_step="device", lookup_tokens=0,
                       max_running_requests=4, join_ahead=True)
    step = eng.worker.device_step
    install_graph_stand_ins(eng)  # buckets 1, 2, 4
    changed = record_changed_launches(step)  # (wraps launch_verify; the spy below wraps it again)
    afters, sizes = [], []  # per verify launched: was the step before it still unread? its requests
    launch = step.launch_verify
    step.launch_verify = lambda d, after=None: (afters.append(after is not None), sizes.append(len(d.reqs)),
                                                launch(d, after=after))[-1]
    sel, n_tok = [0, 4, 8, 12, 2], [3, 9, 6, 9, 5]  # four families; staggered lengths
    free0 = eng.runner.kv.num_free
    out = eng.generate([ids[i] for i in sel], [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in n_tok],
                       [SpecOptions(task=rows[i]["task"]) for i in sel])
    for i, n, o in zip(sel, n_tok, out):
        assert o.output_ids == reference[i][:n], f"{rows[i]['task']} prompt diverged from plain decoding"
    assert step.replays > 0 and sum(o.accepted_tokens for o in out) > 0
    # with graphs (here their stand-ins), steps are launched before the one before them is read:
    # their prefix comes from the device and that step's rejected slots are hidden by the kernel
    assert sum(afters) >= 2, f"steps launched after an unread one: {sum(afters)} of {len(afters)}"
    assert 3 in sizes, f"no batch of three (padded to the bucket of four): {sizes}"
    # a changed batch holding a joining request (its prefix its prompt, its root and hidden state
    # from the pools its chunk wrote) among requests that ran in the unread step
    assert any(changed), f"no changed batch with a joining request launched after an unread step: {changed}"
    assert eng.runner.kv.num_free == free0, "KV slots leaked"
    assert all(attn.nsplit == 2 for attn, _, _ in step.graphs.values()), "the keys were not split in two"


def test_a_changed_batch_is_launched_as_soon_as_the_step_before_is_read(runner, prompts, reference):
    """Four at a time, requests stopping at different steps and others admitted as they go: the
    first step of each changed batch is launched right after the step before is read, before its
    tokens go back to the scheduler (SpecWorker._relaunch_changed): requests that ran in that step
    draft from the pools it wrote, new ones from their first token. Outputs equal plain decoding,
    every KV slot comes back, and with the switch off (the next call launches it) the tokens are
    the same."""
    rows, ids = prompts
    sel, n_tok = [0, 4, 8, 12, 2, 6], [3, 9, 6, 9, 5, 7]
    outputs = {}
    for on in (True, False):
        eng = _spec_engine(runner, "ENTMTP", "mtp", tree_library=str(PRIOR_LIBRARY), spec_step="device",
                           lookup_tokens=0, max_running_requests=4)
        eng.worker.relaunch_changed = on
        step = eng.worker.device_step
        pooled_args = []
        launch = step.launch_draft
        step.launch_draft = lambda li, reqs, trees, pooled=False, log=pooled_args, launch=launch: (
            log.append(pooled), launch(li, reqs, trees, pooled=pooled))[-1]
        free0 = eng.runner.kv.num_free
        out = eng.generate([ids[i] for i in sel], [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in n_tok],
                           [SpecOptions(task=rows[i]["task"]) for i in sel])
        for i, n, o in zip(sel, n_tok, out):
            assert o.output_ids == reference[i][:n], f"{rows[i]['task']} prompt diverged from plain decoding ({on=})"
        assert eng.runner.kv.num_free == free0, "KV slots leaked"
        mixed = [p for p in pooled_args if isinstance(p, list)]  # per request: from the pools?
        if on:
            assert any(any(p) and not all(p) for p in mixed), f"no admitted request joined a relaunch: {mixed}"
            assert any(all(p) for p in mixed), f"no batch that only shrank was relaunched: {mixed}"
        else:
            assert not mixed
        outputs[on] = [o.output_ids for o in out]
    assert outputs[True] == outputs[False]


def test_request_aborted_while_its_device_step_is_in_flight(runner, prompts, reference):
    """The device step is pipelined: after each decode step the next one is already launched.
    Aborting a request then (as the server does between steps) frees its slots of the step in
    flight; the others still equal plain decoding, and every KV slot comes back."""
    rows, ids = prompts
    eng = _spec_engine(runner, "ENTMTP", "mtp", tree_library=str(PRIOR_LIBRARY), spec_step="device", lookup_tokens=0)
    free0 = eng.runner.kv.num_free
    reqs = [eng.make_request(i, SamplingParams(max_new_tokens=N_TOKENS, ignore_eos=True), SpecOptions(task=r["task"]))
            for i, r in zip(ids[:3], rows[:3])]
    for q in reqs:
        eng.scheduler.add(q, bounded=False)
    while not all(q.status.name == "DECODE" for q in reqs):
        eng.scheduler.step()
    for _ in range(2):
        eng.scheduler.step()
    assert eng.worker._inflight is not None, "no device step in flight after a decode step"
    eng.scheduler.abort(reqs[1].rid)
    while eng.scheduler.has_work():
        eng.scheduler.step()
    assert reqs[1].finish_reason == "abort" and len(reqs[1].output_ids) < N_TOKENS
    for i in (0, 2):
        assert reqs[i].output_ids == reference[i]
    assert eng.runner.kv.num_free == free0, "KV slots leaked"


def test_lone_request_verifies_its_tree_in_its_own_layout(runner, prompts, reference):
    """With the shipped batch-1 GPU library (trees of 15-28 nodes whose covering layout is wider
    than any one of them), a lone request's step takes its tree's exact layout, a pair takes a
    covering one, and the lone steps still equal plain decoding."""
    from srt_entmtp.spec.tree_layout import TreeLayout

    rows, ids = prompts
    lib = PRIOR_LIBRARY.parent / "mtp_gpu_b1.json"
    eng = _spec_engine(runner, "ENTMTP", "mtp", tree_library=str(lib), spec_step="device", lookup_tokens=0,
                       max_running_requests=2)
    eng.scheduler.max_running = 1  # one request at a time
    step = eng.worker.device_step
    depth = eng.worker.drafter.max_depth
    trees = list(dict.fromkeys(t.truncate(depth) for t in eng.worker.library.all_trees() if t.num_nodes > 1))
    assert len(trees) > 1
    cover = step.pick(trees[:2], 2)
    assert not step.shapes[cover].lone and all(step.shapes[cover].layout.fits(t) for t in trees[:2])
    for t in trees:
        li = step.pick([t], 1)
        assert step.shapes[li].layout == TreeLayout.covering([t])
        assert step.shapes[li].layout.num_slots < TreeLayout.covering(trees).num_slots
    used = []
    launch = step.launch_draft
    step.launch_draft = lambda li, *a, **kw: used.append(step.shapes[li].lone) or launch(li, *a, **kw)
    pick = [0, 2]  # a code and a math prompt, one at a time
    out = eng.generate([ids[i] for i in pick], SamplingParams(max_new_tokens=N_TOKENS, ignore_eos=True),
                       [SpecOptions(task=rows[i]["task"]) for i in pick])
    for i, o in zip(pick, out):
        assert o.output_ids == reference[i], f"{rows[i]['task']} prompt {rows[i]['id']} diverged"
    assert used and all(used), "a lone request's step did not take its tree's own layout"


def test_lone_layouts_count_only_the_batch_1_librarys_trees(runner, prompts, reference, tmp_path):
    """With a batch-8 library beside the batch-1 one whose trees bring the set past LONE_LAYOUTS
    distinct trees, a lone request still verifies its batch-1 tree in that tree's own layout (it
    once took the covering one: 19 slots for a 15-node tree, past the 16-row tile on the GPU)."""
    import json

    from srt_entmtp.spec.device_step import LONE_LAYOUTS
    from srt_entmtp.spec.tree_layout import TreeLayout

    rows, ids = prompts
    b1 = PRIOR_LIBRARY.parent / "mtp_gpu_b1.json"
    lib8 = json.loads((PRIOR_LIBRARY.parent / "mtp_gpu_b8.json").read_text())
    shapes = [[[0]], [[0], [0, 0]], [[0], [1]], [[0], [0, 0], [0, 0, 0]], [[0], [1], [2]]]
    for fam, paths in zip(lib8["families"].values(), shapes):  # a different small tree for each family
        fam["trees"] = [fam["trees"][0] | {"name": f"t{len(paths)}-{len(paths[-1])}", "paths": paths,
                                           "expected_accept_length": [0.5] * len(fam["bucket_tree"])}]
    p8 = tmp_path / "mtp_gpu_b8.json"
    p8.write_text(json.dumps(lib8))
    eng = _spec_engine(runner, "ENTMTP", "mtp", tree_library=f"{b1},{p8}", spec_step="device", lookup_tokens=0,
                       max_running_requests=2)
    w, step = eng.worker, eng.worker.device_step
    depth = w.drafter.max_depth
    every = {t.truncate(depth) for lib in w.libraries for t in lib.all_trees() if t.num_nodes > 1}
    ones = list(dict.fromkeys(t.truncate(depth) for t in w.libraries[0].all_trees() if t.num_nodes > 1))
    assert len(every) > LONE_LAYOUTS >= len(ones)
    for t in ones:
        assert step.shapes[step.pick([t], 1)].layout == TreeLayout.covering([t])
    used = []
    launch = step.launch_draft
    step.launch_draft = lambda li, *a, **kw: used.append(step.shapes[li].lone) or launch(li, *a, **kw)
    out = eng.generate([ids[0]], SamplingParams(max_new_tokens=N_TOKENS, ignore_eos=True),
                       [SpecOptions(task=rows[0]["task"])])
    assert out[0].output_ids == reference[0]
    assert used and all(used), "a lone request's step did not take its tree's own layout"


def test_device_step_leaves_sampling_batches_to_the_host_path(runner, prompts, reference):
    """A batch holding a sampling request runs the host path (tree rejection sampling); the
    greedy requests beside it still match plain decoding."""
    rows, ids = prompts
    eng = _spec_engine(runner, "ENTMTP", "mtp", tree_library=str(PRIOR_LIBRARY), spec_step="device", lookup_tokens=0)
    sp = [SamplingParams(max_new_tokens=N_TOKENS, ignore_eos=True) for _ in range(3)]
    sp.append(SamplingParams(max_new_tokens=N_TOKENS, ignore_eos=True, temperature=0.8))
    step = eng.worker.device_step
    seen, last = [], [0]

    def watch(outs, dt):  # per step: did it run on the device, and was the sampling request in it?
        seen.append((step.steps > last[0], any(o.req is sampled and o.spec for o in outs)))
        last[0] = step.steps

    eng.step_listeners.append(watch)
    reqs = [eng.make_request(i, s, SpecOptions(task=r["task"])) for i, s, r in zip(ids[:4], sp, rows[:4])]
    sampled = reqs[3]
    for q in reqs:
        eng.scheduler.add(q, bounded=False)
    while not all(q.finished for q in reqs):
        eng._step()
    for r, o in zip(reference[:3], reqs[:3]):
        assert o.output_ids == r
    with_sampling = [dev for dev, has in seen if has]
    assert len(with_sampling) > 2 and not any(with_sampling), "a batch with a sampling request took the device step"


@pytest.mark.parametrize("drafter", ["medusa", "mtp"])
def test_prompt_lookup_branch_equals_plain_decoding(runner, prompts, reference, drafter):
    """Every tree gets a lookup chain of up to 8 tokens grafted under its root (int8 heads on CPU):
    still NONE's output token for token, lookup tokens really verified and accepted, no slot leaked."""
    rows, ids = prompts
    eng = _spec_engine(runner, "ENTMTP", drafter, lookup_tokens=8)
    assert eng.worker.lookup_tokens == 8 and eng.worker.max_new_slots_per_step() >= 8 + 1
    free0 = eng.runner.kv.num_free
    grafted = []
    eng.step_listeners.append(lambda outs, dt: grafted.extend(o.spec["lookup"] for o in outs if o.spec))
    out = eng.generate(ids, SamplingParams(max_new_tokens=N_TOKENS, ignore_eos=True),
                       [SpecOptions(task=r["task"]) for r in rows])
    for r, o, row in zip(reference, out, rows):
        assert o.output_ids == r, f"{drafter}+lookup: {row['task']} prompt {row['id']} diverged from plain decoding"
    assert max(grafted) > 1, "no step carried a lookup chain"
    assert sum(o.meta_info()["lookup_accepted_tokens"] for o in out) > 0, "no lookup token was ever accepted"
    assert eng.runner.kv.num_free == free0, "tree slots leaked"


def test_static_and_per_request_overrides_equal_plain_decoding(runner, prompts, reference):
    rows, ids = prompts
    # the prior library's larger trees: a calibrated 3-node tree may have nothing to prune
    eng = _spec_engine(runner, "STATIC", "medusa", tree_library=str(PRIOR_LIBRARY))
    policies = ["none", "confidence", None]
    specs = [SpecOptions(task=r["task"], policy=policies[i % 3]) for i, r in enumerate(rows)]
    out = eng.generate(ids, SamplingParams(max_new_tokens=N_TOKENS, ignore_eos=True), specs)
    for r, o in zip(reference, out):
        assert o.output_ids == r
    static = eng.worker.policy.tree.name
    for i, o in enumerate(out):
        used = set(o.tree_counts)
        if policies[i % 3] == "none":
            assert used == {ROOT_ONLY.name}
        elif policies[i % 3] is None:
            assert used == {static}
        else:  # confidence pruning: subtrees of the static tree
            assert used and all(int(t[1:].split("d")[0]) <= eng.worker.policy.tree.num_nodes for t in used)
    pruned = {t for i, o in enumerate(out) if policies[i % 3] == "confidence" for t in o.tree_counts}
    assert pruned - {static}, "confidence pruning never removed a node"


def test_steps_where_no_request_drafts_take_the_plain_decode_path(runner, prompts, reference):
    """All requests on root-only trees: a plain decode forward (no tree mask, one KV slot each),
    the same tokens, and the entropy estimates and counters still kept."""
    rows, ids = prompts
    eng = _spec_engine(runner, "ENTMTP", "medusa")
    calls = collections.Counter()
    forward = eng.runner.forward

    def counting(fb):
        calls["tree" if fb.custom_mask is not None else ("decode" if max(fb.q_lens) == 1 else "prefill")] += 1
        return forward(fb)
    eng.runner.forward = counting
    free0 = eng.runner.kv.num_free
    out = eng.generate(ids[:6], SamplingParams(max_new_tokens=N_TOKENS, ignore_eos=True),
                       [SpecOptions(task=r["task"], policy="none") for r in rows[:6]])
    for r, o in zip(reference, out):
        assert o.output_ids == r
    assert calls["tree"] == 0 and calls["decode"] >= N_TOKENS - 1
    for o in out:
        m = o.meta_info()
        assert m["spec_verify_ct"] >= N_TOKENS - 1 and m["spec_accept_length"] == 1.0
        assert set(o.tree_counts) == {ROOT_ONLY.name} and o.entropy_n > 0
    assert eng.runner.kv.num_free == free0
    # one request drafting puts the whole batch back on tree verification
    calls.clear()
    out = eng.generate(ids[:3], SamplingParams(max_new_tokens=8, ignore_eos=True),
                       [SpecOptions(task=rows[0]["task"])] + [SpecOptions(task=r["task"], policy="none")
                                                              for r in rows[1:3]])
    assert calls["tree"] > 0
    for r, o in zip(reference, out):
        assert o.output_ids == r[:8]


def test_a_library_that_never_drafts_decodes_plainly_without_asking_the_policy(runner, prompts, reference):
    """The H200 library (calibrated with CUDA graphs: drafting does not pay there) holds only
    root-only trees: ENTMTP then runs plain decode steps, skips the policy and the entropy
    estimate, and equals NONE."""
    rows, ids = prompts
    lib = default_heads_dir("medusa").parents[1] / "spec" / "libraries" / "medusa_gpu.json"
    eng = _spec_engine(runner, "ENTMTP", "medusa", tree_library=str(lib))
    assert set(eng.worker._never_drafts_for(len(ids))) >= {"code", "math", "chat", "writing", "general"}

    def no_policy(*a, **kw):
        raise AssertionError("the policy was asked although no family drafts")
    eng.worker.policy.choose = no_policy
    out = eng.generate(ids[:5], SamplingParams(max_new_tokens=N_TOKENS, ignore_eos=True),
                       [SpecOptions(task=r["task"]) for r in rows[:5]])
    for r, o in zip(reference, out):
        assert o.output_ids == r
        # nothing reads the estimate when no tree can be chosen: not computed, reported as null
        assert o.meta_info()["spec_accept_length"] == 1.0 and o.meta_info()["mean_entropy"] is None


def _two_sample_chi2_p(a: collections.Counter, b: collections.Counter) -> float:
    """p-value of a two-sample chi-square test of homogeneity (categories pooled below 5)."""
    from scipy.stats import chi2

    na, nb = sum(a.values()), sum(b.values())
    cats = [k for k in set(a) | set(b) if a[k] + b[k] >= 10]
    rest_a = na - sum(a[k] for k in cats)
    rest_b = nb - sum(b[k] for k in cats)
    table = [(a[k], b[k]) for k in cats] + ([(rest_a, rest_b)] if rest_a + rest_b > 0 else [])
    stat = 0.0
    for x, y in table:
        tot = x + y
        ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
        stat += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
    return float(chi2.sf(stat, len(table) - 1))


def test_sampling_through_trees_matches_plain_sampling_distribution(runner, prompts):
    # a short open-ended chat prompt (41 tokens: 384 prefills of it are most of the test's time):
    # a spread-out but not flat next-token distribution
    ids = prompts[1][10]
    n = 384
    sp = [SamplingParams(temperature=1.0, top_k=6, max_new_tokens=3, ignore_eos=True, seed=s) for s in range(n)]
    plain = Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=16384, context_length=1024,
                              max_running_requests=128))
    spec = _spec_engine(runner, "ENTMTP", "medusa", kv_slots=32768, max_running_requests=128, context_length=1024)
    a = [tuple(r.output_ids[1:3]) for r in plain.generate([ids] * n, sp)]
    b = [tuple(r.output_ids[1:3]) for r in spec.generate([ids] * n, [SamplingParams(**vars(s)) for s in sp])]
    # tokens 2 and 3 come from verify steps (token 1 from the prefill): compare their joint law
    p_joint = _two_sample_chi2_p(collections.Counter(a), collections.Counter(b))
    p_second = _two_sample_chi2_p(collections.Counter(x[0] for x in a), collections.Counter(x[0] for x in b))
    assert p_joint > 1e-3 and p_second > 1e-3, (p_joint, p_second)
    # and the test has power: a different temperature is detected
    hot = [SamplingParams(temperature=2.0, top_k=6, max_new_tokens=3, ignore_eos=True, seed=s) for s in range(n)]
    c = [tuple(r.output_ids[1:3]) for r in plain.generate([ids] * n, hot)]
    assert _two_sample_chi2_p(collections.Counter(x[0] for x in a), collections.Counter(x[0] for x in c)) < 1e-3


def test_sampling_through_lookup_chains_matches_plain_sampling_distribution(runner, tokenizer):
    """A prompt that repeats itself, so the lookup branch proposes the continuation it saw; the
    sampled tokens after it must still follow the model's own law (point-mass drafts)."""
    ids = list(tokenizer("red green blue red green blue red green blue red green")["input_ids"])
    n = 384
    sp = [SamplingParams(temperature=1.0, top_k=6, max_new_tokens=4, ignore_eos=True, seed=s) for s in range(n)]
    plain = Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=16384, context_length=1024,
                              max_running_requests=128))
    spec = _spec_engine(runner, "ENTMTP", "mtp", kv_slots=32768, max_running_requests=128, context_length=1024,
                        lookup_tokens=6)
    grafted = []
    spec.step_listeners.append(lambda outs, dt: grafted.extend(o.spec["lookup"] for o in outs if o.spec))
    a = [tuple(r.output_ids[1:3]) for r in plain.generate([ids] * n, sp)]
    out = spec.generate([ids] * n, [SamplingParams(**vars(s)) for s in sp])
    b = [tuple(r.output_ids[1:3]) for r in out]
    assert sum(g > 0 for g in grafted) > n // 2, "the lookup branch was rarely proposed"
    assert sum(r.lookup_accepted for r in out) > 0
    assert len(collections.Counter(a)) >= 4, "the law under test is nearly a point mass"
    p_joint = _two_sample_chi2_p(collections.Counter(a), collections.Counter(b))
    p_second = _two_sample_chi2_p(collections.Counter(x[0] for x in a), collections.Counter(x[0] for x in b))
    assert p_joint > 1e-3 and p_second > 1e-3, (p_joint, p_second)


def test_seeded_sampling_with_speculation_is_reproducible(runner, prompts):
    ids = prompts[1][0]
    spec = _spec_engine(runner, "ENTMTP", "hydra")
    sp = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 16, "ignore_eos": True}
    a = spec.generate([ids], SamplingParams(seed=7, **sp))[0].output_ids
    b = spec.generate([ids] + prompts[1][1:4], [SamplingParams(seed=7, **sp)] + [SamplingParams(temperature=1.0)] * 3)
    assert a == b[0].output_ids


def test_default_heads_are_shipped():
    for kind in ("medusa", "hydra", "mtp"):
        d = default_heads_dir(kind)
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file(), f"missing {d}"
        assert sum(f.stat().st_size for f in d.iterdir()) < 20 * 2**20  # hydra, the largest, is 17 MiB


def test_libraries_per_batch_size_pick_trees_by_the_running_batch(runner, prompts, reference, tmp_path):
    """Two libraries, calibrated at batch 1 (drafts) and batch 4 (never drafts): a lone request
    drafts, four together run plain decode steps, and both equal plain decoding."""
    import json

    _, ids = prompts
    lib1 = json.loads(PRIOR_LIBRARY.read_text())
    lib4 = json.loads((PRIOR_LIBRARY.parent / "medusa_gpu.json").read_text()) | {"drafter": "mtp", "batch_size": 4}
    p1, p4 = tmp_path / "b1.json", tmp_path / "b4.json"
    p1.write_text(json.dumps(lib1))
    p4.write_text(json.dumps(lib4))
    eng = _spec_engine(runner, "ENTMTP", "mtp", tree_library=f"{p4},{p1}", lookup_tokens=0, max_running_requests=4)
    assert [lib.batch_size for lib in eng.worker.libraries] == [1, 4]
    sp = SamplingParams(max_new_tokens=N_TOKENS, ignore_eos=True)
    alone = eng.generate(ids[:1], sp)[0]
    assert alone.output_ids == reference[0] and alone.accepted_tokens > 0, "a lone request should draft (batch-1 library)"
    four = eng.generate(ids[1:5], sp)
    for r, o in zip(reference[1:5], four):
        assert o.output_ids == r and o.accepted_tokens == 0, "four requests should not draft (batch-4 library)"


def test_libraries_used_together_must_share_one_estimator(runner, tmp_path):
    import json

    a = json.loads(PRIOR_LIBRARY.read_text())
    b = json.loads(PRIOR_LIBRARY.read_text()) | {"batch_size": 8}
    b["policy"]["estimator"]["ema_decay"] = 0.5
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    with pytest.raises(ValueError, match=r"b\.json: policy\.estimator .* must share one estimator"):
        _spec_engine(runner, "ENTMTP", "mtp", tree_library=f"{pa},{pb}")
