"""Shared hypothesis strategies and settings for the spec tests."""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from srt_entmtp.spec.tree import Tree

# no deadline: the first call of a torch op can be slow on a loaded 2-core machine
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def path_lists(draw, max_nodes: int = 16, max_depth: int = 5, max_rank: int = 4) -> list[tuple[int, ...]]:
    """A valid, shuffled list of non-root paths (ranks may have gaps)."""
    n = draw(st.integers(0, max_nodes))
    paths: list[tuple[int, ...]] = [()]
    used: dict[tuple[int, ...], set[int]] = {(): set()}
    for _ in range(n):
        parent = draw(st.sampled_from(paths))
        free = [r for r in range(max_rank) if r not in used[parent]]
        if len(parent) >= max_depth or not free:
            continue
        r = draw(st.sampled_from(free))
        p = parent + (r,)
        paths.append(p)
        used[p] = set()
        used[parent].add(r)
    return draw(st.permutations(paths[1:]))


@st.composite
def trees(draw, max_nodes: int = 16, max_depth: int = 5, max_rank: int = 4) -> Tree:
    return Tree.from_paths(draw(path_lists(max_nodes, max_depth, max_rank)))


def batches(max_requests: int = 4, max_nodes: int = 12, max_prefix: int = 9):
    """(list of trees, list of prefix lengths)."""
    return st.integers(1, max_requests).flatmap(
        lambda b: st.tuples(st.lists(trees(max_nodes), min_size=b, max_size=b),
                            st.lists(st.integers(0, max_prefix), min_size=b, max_size=b)))
