"""Draft heads that fill token trees: Medusa (independent), Hydra (sequential), shared MTP (recursive).

    drafter = load_drafter(heads_dir, runner.model)        # or MedusaDrafter.load(...)
    out = drafter.propose(hidden[B, H], root_tokens[B], ragged_tree_batch)
    out.node_tokens, out.node_probs, out.path_conf        # flat over the batch's nodes
"""
from srt_entmtp.spec.drafters.base import (
    Drafter,
    DraftOutput,
    HeadsLoadError,
    base_model_name,
    load_drafter,
    read_config,
)
from srt_entmtp.spec.drafters.hydra import HydraDrafter
from srt_entmtp.spec.drafters.medusa import MedusaDrafter
from srt_entmtp.spec.drafters.mtp import MTPDrafter

DRAFTERS: dict[str, type[Drafter]] = {"medusa": MedusaDrafter, "hydra": HydraDrafter, "mtp": MTPDrafter}


def create_drafter(kind: str, base, **kw) -> Drafter:
    """A fresh (untrained) drafter of `kind` on `base`; kw = the kind's arch args and draft_vocab."""
    if kind not in DRAFTERS:
        raise ValueError(f"unknown drafter kind {kind!r}; choose {', '.join(DRAFTERS)}")
    return DRAFTERS[kind](base, **kw)


__all__ = ["DRAFTERS", "DraftOutput", "Drafter", "HeadsLoadError", "HydraDrafter", "MTPDrafter", "MedusaDrafter",
           "base_model_name", "create_drafter", "load_drafter", "read_config"]
