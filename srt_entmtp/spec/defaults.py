"""The shipped default tree library: a placeholder prior, not a measurement.

Until calibration has measured acceptance per task family, entropy bucket, depth and rank on the
served model, the server still needs sane trees. This module builds them from a hand-set
acceptance model that only encodes the qualitative facts EntMTP relies on:

* acceptance falls with the target's next-token entropy h: top-1 acceptance of the first head is
  q(h) = q_family * exp(-h / 4), with q_family = 0.85 code, 0.80 math, 0.72 general, 0.70 chat,
  0.60 writing (code and arithmetic are more predictable than free prose);
* each deeper head is less accurate: q_d = q(h) * 0.88^d;
* lower-ranked candidates pick up part of the rest: acc[d, r] = q_d * ((1 - q_d) * 0.45)^r.

Per family there are three entropy buckets, edges 1.0 and 2.5 nats, with representative entropies
0.5, 1.75 and 3.5; each bucket gets the optimal tree (builders.optimal_tree) of 48, 24 and 8
nodes for its own table, and every tree's expected accepted length is reported per bucket.
Regenerate the JSON with `python -m srt_entmtp.spec.defaults`.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from srt_entmtp.spec.builders import expected_accept_length, optimal_tree
from srt_entmtp.spec.library import EstimatorConfig, Family, PolicyConfig, TreeEntry, TreeLibrary

DEFAULT_PATH = Path(__file__).with_name("libraries") / "default.json"
FAMILY_TOP1 = {"code": 0.85, "math": 0.80, "chat": 0.70, "writing": 0.60, "general": 0.72}
BUCKET_EDGES = (1.0, 2.5)
BUCKET_ENTROPY = (0.5, 1.75, 3.5)
BUCKET_NODES = (48, 24, 8)          # low entropy pays for a big tree, high entropy does not
DEPTH, RANKS = 6, 8


def prior_table(top1: float, entropy: float, depth: int = DEPTH, ranks: int = RANKS) -> torch.Tensor:
    """The placeholder acceptance table acc[d, r] for one family at one entropy (module doc)."""
    q = top1 * math.exp(-entropy / 4.0) * 0.88 ** torch.arange(depth, dtype=torch.float64)
    r = torch.arange(ranks, dtype=torch.float64)
    return q.unsqueeze(1) * ((1 - q.unsqueeze(1)) * 0.45) ** r.unsqueeze(0)


def _family(name: str) -> Family:
    tables = [prior_table(FAMILY_TOP1[name], h) for h in BUCKET_ENTROPY]
    entries = []
    for size, table in zip(BUCKET_NODES, tables):
        tree = optimal_tree(table, size, DEPTH)
        eal = tuple(round(expected_accept_length(tree, t), 4) for t in tables)
        entries.append(TreeEntry(f"{name}-{size}", tree, eal))
    return Family(name, tuple(entries), BUCKET_EDGES, tuple(range(len(BUCKET_NODES))))


def build_default_library(model: str = "any", drafter: str = "any") -> TreeLibrary:
    policy = PolicyConfig(EstimatorConfig(mode="ema", ema_decay=0.7, window=8, init=BUCKET_ENTROPY[1]),
                          hysteresis=0.1, min_steps_between_switches=2)
    families = {name: _family(name) for name in FAMILY_TOP1}
    return TreeLibrary(model, drafter, "placeholder prior: not measured on any hardware", policy, families,
                       source="<default>",
                       description="Uncalibrated placeholder built from a hand-set acceptance prior "
                                   "(srt_entmtp/spec/defaults.py); replace with a calibrated library.")


def main(argv: list[str] | None = None) -> None:
    """Write the default library to DEFAULT_PATH (or the path given)."""
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else DEFAULT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    build_default_library().save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
