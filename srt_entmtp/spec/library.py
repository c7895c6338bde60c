"""The tree library: which token tree to verify, per task family and entropy bucket.

A library is a versioned JSON file written by calibration for one model and drafter (format in
docs/tree_library.md, schema in tree_library.schema.json). Loading validates everything up front
and reports the first problem as `<file>: <json.path>: <what is wrong>`, so a bad file fails at
start-up with a message that points at the field, never mid-request. After loading, choosing a
tree is a bisect (one request) or a torch.bucketize (a batch).
"""
from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import jsonschema
import torch

from srt_entmtp.spec.classify import TASK_FAMILIES
from srt_entmtp.spec.tree import Tree, TreeError

FORMAT = "entmtp-tree-library"
VERSION = 1
DRAFTERS = ("medusa", "hydra", "mtp", "any")
SCHEMA_PATH = FsPath(__file__).with_name("tree_library.schema.json")


class LibraryError(ValueError):
    """A library file is unreadable or invalid; the message names the file and the JSON path."""

    def __init__(self, source: str, path: str, message: str):
        self.source, self.path = source, path
        super().__init__(f"{source}: {path}: {message}" if path else f"{source}: {message}")


def json_path(parts: Iterable[Any]) -> str:
    """`families.code.trees[1].paths` from ["families", "code", "trees", 1, "paths"]."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@dataclass(frozen=True)
class EstimatorConfig:
    mode: str = "ema"
    ema_decay: float = 0.7
    window: int = 8
    init: float = 2.0
    draft_mix: float = 0.0


@dataclass(frozen=True)
class PolicyConfig:
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    hysteresis: float = 0.1
    min_steps_between_switches: int = 2
    lookup_tokens: int = 0      # prompt-lookup branch of up to this many tokens on every tree (0: off)
    lookup_min_match: int = 2   # ... when the request's last tokens occurred before at least this long


@dataclass(frozen=True)
class TreeEntry:
    name: str
    tree: Tree
    expected_accept_length: tuple[float, ...]
    step_cost_ms: float | None = None


@dataclass(frozen=True)
class Family:
    """One task family: its trees and the tree for each entropy bucket."""

    name: str
    trees: tuple[TreeEntry, ...]
    bucket_edges: tuple[float, ...]
    bucket_tree: tuple[int, ...]

    @property
    def num_buckets(self) -> int:
        return len(self.bucket_tree)

    def bucket_of(self, entropy: float) -> int:
        """Bucket i covers [edges[i-1], edges[i]): the number of edges <= entropy."""
        return bisect.bisect_right(self.bucket_edges, entropy)

    def tree_for_bucket(self, bucket: int) -> Tree:
        return self.trees[self.bucket_tree[bucket]].tree


class TreeLibrary:
    def __init__(self, model: str, drafter: str, hardware: str, policy: PolicyConfig,
                 families: dict[str, Family], source: str = "<library>", description: str | None = None,
                 batch_size: int = 1):
        self.model, self.drafter, self.hardware, self.batch_size = model, drafter, hardware, int(batch_size)
        self.policy, self.source, self.description = policy, source, description
        self._families = dict(families)
        self._edges: dict[tuple[str, str], torch.Tensor] = {}

    # ---- loading and saving ----

    @classmethod
    def load(cls, path: str | FsPath, expect_model: str | None = None,
             expect_drafter: str | None = None) -> TreeLibrary:
        source = str(path)
        try:
            text = FsPath(path).read_text()
        except OSError as e:
            raise LibraryError(source, "", f"cannot read file: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LibraryError(source, "", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        lib = cls.from_dict(data, source=source)
        lib.check_matches(expect_model, expect_drafter)
        return lib

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>") -> TreeLibrary:
        _check_schema(d, source)
        if d["version"] != VERSION:
            raise LibraryError(source, "version", f"unsupported version {d['version']} (this build reads version {VERSION})")
        est = d["policy"]["estimator"]
        policy = PolicyConfig(
            estimator=EstimatorConfig(mode=est["mode"], ema_decay=float(est["ema_decay"]), window=int(est["window"]),
                                      init=float(est["init"]), draft_mix=float(est.get("draft_mix", 0.0))),
            hysteresis=float(d["policy"]["hysteresis"]),
            min_steps_between_switches=int(d["policy"]["min_steps_between_switches"]),
            lookup_tokens=int(d["policy"].get("lookup", {}).get("max_tokens", 0)),
            lookup_min_match=int(d["policy"].get("lookup", {}).get("min_match", 2)),
        )
        families = {name: _parse_family(name, fam, source) for name, fam in d["families"].items()}
        return cls(d["model"], d["drafter"], d["hardware"], policy, families, source, d.get("description"),
                   d.get("batch_size", 1))

    def check_matches(self, expect_model: str | None, expect_drafter: str | None) -> None:
        """Refuse a library calibrated for another model or drafter ("any" matches everything)."""
        if expect_model is not None and self.model not in ("any", expect_model):
            raise LibraryError(self.source, "model",
                               f"library was calibrated for model {self.model!r} but the server runs {expect_model!r}")
        if expect_drafter is not None and self.drafter not in ("any", expect_drafter):
            raise LibraryError(self.source, "drafter",
                               f"library was calibrated for drafter {self.drafter!r} but the server uses {expect_drafter!r}")

    def to_dict(self) -> dict[str, Any]:
        e = self.policy.estimator
        estimator: dict[str, Any] = {"mode": e.mode, "ema_decay": e.ema_decay, "window": e.window, "init": e.init}
        if e.draft_mix:
            estimator["draft_mix"] = e.draft_mix
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": self.model, "drafter": self.drafter,
                               "hardware": self.hardware}
        if self.description:
            out["description"] = self.description
        if self.batch_size != 1:
            out["batch_size"] = self.batch_size
        out["policy"] = {"estimator": estimator, "hysteresis": self.policy.hysteresis,
                         "min_steps_between_switches": self.policy.min_steps_between_switches}
        if self.policy.lookup_tokens:
            out["policy"]["lookup"] = {"max_tokens": self.policy.lookup_tokens,
                                       "min_match": self.policy.lookup_min_match}
        out["families"] = {name: _family_dict(f) for name, f in self._families.items()}
        return out

    def save(self, path: str | FsPath) -> None:
        FsPath(path).write_text(dumps(self.to_dict()) + "\n")

    # ---- queries ----

    @property
    def families(self) -> dict[str, Family]:
        return self._families

    def family(self, name: str | None) -> Family:
        """The named family, or `general` for unknown / missing families."""
        return self._families.get(name or "general", self._families["general"])

    def tree_by_name(self, name: str) -> Tree:
        """A tree by its entry name in any family (e.g. "code-48") or by its Tree.name id."""
        for fam in self._families.values():
            for entry in fam.trees:
                if name in (entry.name, entry.tree.name):
                    return entry.tree
        known = sorted({e.name for f in self._families.values() for e in f.trees})
        raise LibraryError(self.source, "", f"no tree named {name!r} (known: {', '.join(known)})")

    def all_trees(self) -> list[Tree]:
        """Every distinct tree in the library (e.g. to capture one CUDA graph per tree shape)."""
        seen: dict[Tree, None] = {}
        for fam in self._families.values():
            for entry in fam.trees:
                seen.setdefault(entry.tree, None)
        return sorted(seen, key=lambda t: (t.num_nodes, t.name))

    @property
    def max_tree_nodes(self) -> int:
        return max(t.num_nodes for t in self.all_trees())

    def bucket(self, family: str | None, entropy: torch.Tensor) -> torch.Tensor:
        """LongTensor[B]: each entropy's bucket in `family` (same rule as Family.bucket_of)."""
        fam = self.family(family)
        key = (fam.name, str(entropy.device))
        edges = self._edges.get(key)
        if edges is None:
            edges = self._edges[key] = torch.tensor(fam.bucket_edges, dtype=torch.float32, device=entropy.device)
        return torch.bucketize(entropy.float(), edges, right=True)

    def choose(self, family: str | None, entropy_state: float | torch.Tensor | None) -> Tree:
        """The tree for one request; None (no estimate yet) uses the estimator's prior."""
        fam = self.family(family)
        h = self.policy.estimator.init if entropy_state is None else float(entropy_state)
        return fam.tree_for_bucket(fam.bucket_of(h))

    def make_tracker(self, capacity: int):
        """An EntropyTracker configured by this library's policy section (host state)."""
        from srt_entmtp.spec.entropy import EntropyTracker

        e = self.policy.estimator
        return EntropyTracker(capacity, mode=e.mode, ema_decay=e.ema_decay, window=e.window, init=e.init,
                              draft_mix=e.draft_mix)

    def __repr__(self) -> str:
        return (f"TreeLibrary({self.source}, model={self.model!r}, drafter={self.drafter!r}, "
                f"families={list(self._families)}, trees={len(self.all_trees())})")


# ---- validation helpers ----

_SCHEMA: dict | None = None


def schema() -> dict:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = json.loads(SCHEMA_PATH.read_text())
    return _SCHEMA


def _check_schema(d: Any, source: str) -> None:
    if not isinstance(d, dict):
        raise LibraryError(source, "", f"top level must be a JSON object, got {type(d).__name__}")
    # the format tag first: a file that is not a library at all gets that message, not 20 others
    if d.get("format") != FORMAT:
        raise LibraryError(source, "format", f"must be {FORMAT!r}, got {d.get('format')!r}")
    validator = jsonschema.Draft202012Validator(schema())
    err = jsonschema.exceptions.best_match(validator.iter_errors(d))
    if err is None:
        return
    parts = list(err.absolute_path)
    if err.validator == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        raise LibraryError(source, json_path(parts + missing[:1]), "required field is missing")
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        where = json_path(parts + extra[:1])
        if parts == ["families"]:
            raise LibraryError(source, where, f"unknown task family (known: {', '.join(TASK_FAMILIES)})")
        raise LibraryError(source, where, "unknown field")
    raise LibraryError(source, json_path(parts), _schema_message(err))


def _schema_message(err: jsonschema.ValidationError) -> str:
    v, want = err.validator, err.validator_value
    got = json.dumps(err.instance)[:60]
    if v == "type":
        return f"must be of type {want}, got {got}"
    if v in ("enum", "const"):
        allowed = want if v == "enum" else [want]
        return f"must be one of {', '.join(json.dumps(a) for a in allowed)}, got {got}"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return f"must be {op} {want}, got {got}"
    if v in ("minItems", "minLength"):
        return "must not be empty"
    return err.message


def _parse_family(name: str, fam: dict, source: str) -> Family:
    where = ["families", name]
    edges = [float(e) for e in fam["bucket_edges"]]
    if not all(math.isfinite(e) for e in edges):
        raise LibraryError(source, json_path(where + ["bucket_edges"]), "must be finite numbers")
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise LibraryError(source, json_path(where + ["bucket_edges"]), f"must be strictly increasing, got {edges}")
    nb = len(edges) + 1
    choice = list(fam["bucket_tree"])
    if len(choice) != nb:
        raise LibraryError(source, json_path(where + ["bucket_tree"]),
                           f"needs one tree index per bucket: {nb} (len(bucket_edges) + 1), got {len(choice)}")
    ntrees = len(fam["trees"])
    for i, c in enumerate(choice):
        if c >= ntrees:
            raise LibraryError(source, json_path(where + ["bucket_tree", i]),
                               f"tree index {c} out of range (family has {ntrees} trees)")
    entries: list[TreeEntry] = []
    names: set[str] = set()
    for i, t in enumerate(fam["trees"]):
        at = where + ["trees", i]
        if t["name"] in names:
            raise LibraryError(source, json_path(at + ["name"]), f"duplicate tree name {t['name']!r}")
        names.add(t["name"])
        try:
            tree = Tree.from_paths(t["paths"])
        except TreeError as e:
            raise LibraryError(source, json_path(at + ["paths"]), str(e)) from None
        eal = tuple(float(x) for x in t["expected_accept_length"])
        if len(eal) != nb:
            raise LibraryError(source, json_path(at + ["expected_accept_length"]),
                               f"needs one value per bucket: {nb}, got {len(eal)}")
        if any(x > tree.depth + 1e-9 for x in eal):
            raise LibraryError(source, json_path(at + ["expected_accept_length"]),
                               f"values cannot exceed the tree depth {tree.depth}")
        cost = t.get("step_cost_ms")
        entries.append(TreeEntry(t["name"], tree, eal, None if cost is None else float(cost)))
    return Family(name, tuple(entries), tuple(edges), tuple(int(c) for c in choice))


def _family_dict(f: Family) -> dict[str, Any]:
    trees = []
    for e in f.trees:
        t: dict[str, Any] = {"name": e.name, "paths": e.tree.to_json(),
                             "expected_accept_length": [round(x, 6) for x in e.expected_accept_length]}
        if e.step_cost_ms is not None:
            t["step_cost_ms"] = e.step_cost_ms
        trees.append(t)
    return {"trees": trees, "bucket_edges": list(f.bucket_edges), "bucket_tree": list(f.bucket_tree)}


def dumps(obj: Any, indent: int = 2, _level: int = 0) -> str:
    """JSON with one line per tree path list and per number list, so diffs stay readable."""
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    flat = isinstance(obj, list) and all(not isinstance(x, (dict, list)) or
                                         (isinstance(x, list) and all(not isinstance(y, (dict, list)) for y in x))
                                         for x in obj)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent, _level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and not flat:
        items = [f"{inner}{dumps(v, indent, _level + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    nested = isinstance(obj, list) and any(isinstance(x, list) for x in obj)
    return json.dumps(obj, separators=(",", ":") if nested else (", ", ": "))


def default_library(model: str = "any", drafter: str = "any") -> TreeLibrary:
    """An uncalibrated placeholder library (see srt_entmtp/spec/defaults.py)."""
    from srt_entmtp.spec.defaults import build_default_library

    return build_default_library(model=model, drafter=drafter)
