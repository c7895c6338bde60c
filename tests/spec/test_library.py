"""Tree library: the shipped default, round trips, bucketing, and one error per kind of bad file."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import torch

from srt_entmtp.spec import defaults
from srt_entmtp.spec.library import SCHEMA_PATH, LibraryError, TreeLibrary, default_library
from srt_entmtp.spec.tree import Tree

DEFAULT = default_library()


def good() -> dict:
    return copy.deepcopy(DEFAULT.to_dict())


def test_shipped_default_file_is_current_and_valid():
    on_disk = json.loads(defaults.DEFAULT_PATH.read_text())
    jsonschema.validate(on_disk, json.loads(SCHEMA_PATH.read_text()))
    assert on_disk == good(), "regenerate with `python -m srt_entmtp.spec.defaults`"
    lib = TreeLibrary.load(defaults.DEFAULT_PATH, expect_model="SmolLM2-135M-Instruct", expect_drafter="medusa")
    assert set(lib.families) == {"code", "math", "chat", "writing", "general"}
    for fam in lib.families.values():
        assert [e.tree.num_nodes - 1 for e in fam.trees] == [48, 24, 8]
        assert fam.bucket_edges == (1.0, 2.5) and fam.bucket_tree == (0, 1, 2)
        # each bucket's own tree is the best of the three in that bucket, and bigger trees win at low entropy
        for b in range(3):
            assert max(range(3), key=lambda i: fam.trees[i].expected_accept_length[b]) == 0
        assert fam.trees[0].expected_accept_length[0] > fam.trees[0].expected_accept_length[2]


def test_round_trip_and_save(tmp_path):
    lib = TreeLibrary.from_dict(good())
    assert lib.to_dict() == good()
    path = tmp_path / "lib.json"
    lib.save(path)
    again = TreeLibrary.load(path)
    assert again.to_dict() == good()
    assert again.all_trees() == lib.all_trees()
    assert all(a is b for a, b in zip(again.all_trees(), lib.all_trees()))   # interned trees
    assert again.max_tree_nodes == 49
    distinct = {e.tree.paths for f in lib.families.values() for e in f.trees}
    assert len(lib.all_trees()) == len(set(lib.all_trees())) == len(distinct)


def test_lookup_setting_round_trips_and_defaults_to_off():
    assert TreeLibrary.from_dict(good()).policy.lookup_tokens == 0
    d = good()
    d["policy"]["lookup"] = {"max_tokens": 8, "min_match": 3}
    lib = TreeLibrary.from_dict(d)
    assert (lib.policy.lookup_tokens, lib.policy.lookup_min_match) == (8, 3)
    assert lib.to_dict() == d
    d["policy"]["lookup"] = {"max_tokens": 5}
    assert TreeLibrary.from_dict(d).policy.lookup_min_match == 2


def test_bucket_and_choose():
    lib = DEFAULT
    h = torch.tensor([0.0, 0.99, 1.0, 2.0, 2.5, 9.0])
    assert lib.bucket("code", h).tolist() == [0, 0, 1, 1, 2, 2]
    code = lib.families["code"]
    for x in h.tolist():
        assert lib.choose("code", x) is code.tree_for_bucket(code.bucket_of(x))
    assert lib.choose("code", 0.1).num_nodes == 49 and lib.choose("code", 5.0).num_nodes == 9
    assert lib.choose("no-such-family", 0.1) is lib.choose("general", 0.1)
    assert lib.choose(None, None) is lib.choose("general", lib.policy.estimator.init)
    assert lib.choose("math", torch.tensor(3.0)).num_nodes == 9
    tracker = lib.make_tracker(4)
    assert tracker.value(torch.arange(2)).tolist() == [lib.policy.estimator.init] * 2


def mutate(fn):
    def run():
        d = good()
        fn(d)
        return d
    return run


def _set(d, path, value):
    *head, last = path
    for k in head:
        d = d[k]
    d[last] = value


def _del(d, path):
    *head, last = path
    for k in head:
        d = d[k]
    del d[last]


BAD = [
    # (id, mutation, expected json path, expected message fragment)
    ("format", lambda d: _set(d, ["format"], "something-else"), "format", "must be 'entmtp-tree-library'"),
    ("version", lambda d: _set(d, ["version"], 2), "version", "unsupported version 2"),
    ("version-type", lambda d: _set(d, ["version"], "1"), "version", "must be of type integer"),
    ("missing-model", lambda d: _del(d, ["model"]), "model", "required field is missing"),
    ("missing-general", lambda d: _del(d, ["families", "general"]), "families.general", "required field is missing"),
    ("missing-edges", lambda d: _del(d, ["families", "code", "bucket_edges"]), "families.code.bucket_edges",
     "required field is missing"),
    ("unknown-family", lambda d: _set(d, ["families", "poetry"], d["families"]["writing"]), "families.poetry",
     "unknown task family"),
    ("unknown-field", lambda d: _set(d, ["policy", "hysterisis"], 0.2), "policy.hysterisis", "unknown field"),
    ("drafter-enum", lambda d: _set(d, ["drafter"], "eagle"), "drafter", "must be one of"),
    ("mode-enum", lambda d: _set(d, ["policy", "estimator", "mode"], "median"), "policy.estimator.mode",
     "must be one of"),
    ("decay-range", lambda d: _set(d, ["policy", "estimator", "ema_decay"], 1.0), "policy.estimator.ema_decay",
     "must be < 1"),
    ("hysteresis-negative", lambda d: _set(d, ["policy", "hysteresis"], -0.1), "policy.hysteresis", "must be >= 0"),
    ("edges-order", lambda d: _set(d, ["families", "code", "bucket_edges"], [2.5, 1.0]), "families.code.bucket_edges",
     "must be strictly increasing"),
    ("edges-equal", lambda d: _set(d, ["families", "math", "bucket_edges"], [1.0, 1.0]), "families.math.bucket_edges",
     "must be strictly increasing"),
    ("edges-type", lambda d: _set(d, ["families", "math", "bucket_edges"], [1.0, "x"]),
     "families.math.bucket_edges[1]", "must be of type number"),
    ("bucket-tree-length", lambda d: _set(d, ["families", "chat", "bucket_tree"], [0, 1]),
     "families.chat.bucket_tree", "needs one tree index per bucket: 3"),
    ("bucket-tree-range", lambda d: _set(d, ["families", "chat", "bucket_tree"], [0, 1, 7]),
     "families.chat.bucket_tree[2]", "tree index 7 out of range"),
    ("bucket-tree-negative", lambda d: _set(d, ["families", "chat", "bucket_tree"], [0, -1, 2]),
     "families.chat.bucket_tree[1]", "must be >= 0"),
    ("eal-length", lambda d: _set(d, ["families", "writing", "trees", 1, "expected_accept_length"], [1.0]),
     "families.writing.trees[1].expected_accept_length", "needs one value per bucket: 3"),
    ("eal-too-big", lambda d: _set(d, ["families", "writing", "trees", 2, "expected_accept_length"], [9.0, 1.0, 1.0]),
     "families.writing.trees[2].expected_accept_length", "cannot exceed the tree depth"),
    ("tree-missing-prefix", lambda d: _set(d, ["families", "general", "trees", 0, "paths"], [[0], [1, 0]]),
     "families.general.trees[0].paths", "prefix (1,) is missing"),
    ("tree-duplicate-path", lambda d: _set(d, ["families", "general", "trees", 2, "paths"], [[0], [0]]),
     "families.general.trees[2].paths", "appears twice"),
    ("tree-negative-rank", lambda d: _set(d, ["families", "general", "trees", 2, "paths"], [[0], [0, -3]]),
     "families.general.trees[2].paths[1][1]", "must be >= 0"),
    ("tree-too-deep", lambda d: _set(d, ["families", "code", "trees", 2, "paths"], [[0] * k for k in range(1, 18)]),
     "families.code.trees[2].paths", "max_depth 16"),
    ("tree-name-duplicate", lambda d: _set(d, ["families", "code", "trees", 1, "name"], "code-48"),
     "families.code.trees[1].name", "duplicate tree name"),
    ("no-trees", lambda d: _set(d, ["families", "code", "trees"], []), "families.code.trees", "must not be empty"),
    ("lookup-too-long", lambda d: _set(d, ["policy", "lookup"], {"max_tokens": 40}), "policy.lookup.max_tokens",
     "must be <= 16"),
    ("lookup-min-match", lambda d: _set(d, ["policy", "lookup"], {"max_tokens": 8, "min_match": 0}),
     "policy.lookup.min_match", "must be >= 1"),
    ("lookup-unknown", lambda d: _set(d, ["policy", "lookup"], {"max_tokens": 8, "tokens": 3}),
     "policy.lookup.tokens", "unknown field"),
    ("cost-type", lambda d: _set(d, ["families", "code", "trees", 0, "step_cost_ms"], "fast"),
     "families.code.trees[0].step_cost_ms", "must be of type number"),
]


@pytest.mark.parametrize("mutation, where, fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_file_errors_name_file_and_field(tmp_path, mutation, where, fragment):
    path = tmp_path / "tree_library.json"
    path.write_text(json.dumps(mutate(mutation)()))
    with pytest.raises(LibraryError) as e:
        TreeLibrary.load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {where}: "), msg
    assert "tree_library.json" in msg and fragment in msg, msg
    assert e.value.path == where


def test_unreadable_and_malformed_files(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(LibraryError, match="nope.json: cannot read file"):
        TreeLibrary.load(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "entmtp-tree-library",\n  "version": 1,,}')
    with pytest.raises(LibraryError, match=r"broken.json: invalid JSON at line 2 column"):
        TreeLibrary.load(broken)
    listy = tmp_path / "list.json"
    listy.write_text("[]")
    with pytest.raises(LibraryError, match="list.json: top level must be a JSON object"):
        TreeLibrary.load(listy)


def test_model_and_drafter_mismatch(tmp_path):
    d = good()
    d["model"], d["drafter"] = "SmolLM2-135M-Instruct", "medusa"
    path = tmp_path / "smol.json"
    path.write_text(json.dumps(d))
    TreeLibrary.load(path, expect_model="SmolLM2-135M-Instruct", expect_drafter="medusa")
    with pytest.raises(LibraryError) as e:
        TreeLibrary.load(path, expect_model="Qwen3-0.6B")
    assert str(e.value) == (f"{path}: model: library was calibrated for model 'SmolLM2-135M-Instruct' "
                            f"but the server runs 'Qwen3-0.6B'")
    with pytest.raises(LibraryError) as e:
        TreeLibrary.load(path, expect_drafter="hydra")
    assert f"{path}: drafter:" in str(e.value) and "'medusa'" in str(e.value) and "'hydra'" in str(e.value)


def test_minimal_library_only_general():
    d = {"format": "entmtp-tree-library", "version": 1, "model": "m", "drafter": "mtp", "hardware": "",
         "policy": {"estimator": {"mode": "window", "ema_decay": 0.5, "window": 4, "init": 2.0},
                    "hysteresis": 0.0, "min_steps_between_switches": 0},
         "families": {"general": {"trees": [{"name": "plain", "paths": [], "expected_accept_length": [0.0]}],
                                  "bucket_edges": [], "bucket_tree": [0]}}}
    lib = TreeLibrary.from_dict(d, source="inline")
    assert lib.choose("code", 0.3) is Tree.from_paths([])
    assert lib.bucket("code", torch.tensor([0.0, 5.0])).tolist() == [0, 0]
    assert lib.to_dict() == d


def test_docs_example_is_a_valid_library():
    doc = Path(__file__).resolve().parents[2] / "docs" / "tree_library.md"
    text = doc.read_text()
    example = text.split("```json\n", 1)[1].split("```", 1)[0]
    lib = TreeLibrary.from_dict(json.loads(example), source=str(doc))
    assert lib.choose("code", 0.5).num_nodes == 8 and lib.choose("code", 3.0).num_nodes == 4
    assert lib.choose("writing", 0.5) is Tree.from_paths([])


def test_tree_by_name():
    lib = DEFAULT
    t = lib.tree_by_name("code-48")
    assert t is lib.families["code"].trees[0].tree
    assert lib.tree_by_name(t.name) is t
    with pytest.raises(LibraryError, match=r"no tree named 'code-7' \(known: chat-24, chat-48"):
        lib.tree_by_name("code-7")
