"""A request's whole life: parameters, KV slots, outputs and speculative state."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    seed: int | None = None
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raises ValueError(param, message) for out-of-range values (the server turns it into a 400)."""
        if not (0.0 <= self.temperature <= 100.0):
            raise ParamError("temperature", f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ParamError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ParamError("top_k", f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ParamError("max_tokens", f"max_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and not (-(2**63) <= self.seed < 2**64):
            raise ParamError("seed", f"seed must fit in 64 bits, got {self.seed}")
        if len(self.stop) > 16:
            raise ParamError("stop", "at most 16 stop strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class ParamError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class SpecOptions:
    """Per-request speculative options (the `entmtp` extension object of the API)."""
    task: str | None = None     # code | math | chat | writing | general; None = classify the prompt
    policy: str | None = None   # entmtp | static | confidence | none; None = the server's default
    tree: str | None = None     # a library tree name, for policy=static


class Status(enum.Enum):
    WAITING = 0
    PREFILL = 1
    DECODE = 2
    FINISHED = 3


_ids = itertools.count()
_NO_SLOTS = np.empty(0, dtype=np.int64)


class Request:
    def __init__(self, prompt_ids: list[int], sampling: SamplingParams, spec: SpecOptions | None = None,
                 rid: str | None = None, prompt_text: str = ""):
        self.rid = rid or f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.prompt_text = prompt_text
        self.sampling = sampling
        self.spec = spec or SpecOptions()
        self.status = Status.WAITING
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None      # stop | length | abort
        # tokens whose KV is cached, in order: a growable host array, appended to every step (a
        # torch.cat per request and step cost ~3 us each, a quarter of a batch-64 step's host work)
        self._kv = _NO_SLOTS
        self._kv_n = 0
        self.num_prefilled = 0                      # prompt tokens already in the cache
        self.generator: torch.Generator | None = None
        if sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(sampling.seed)
        # speculative state, owned by the spec worker
        self.task: str = self.spec.task or "general"
        self.last_hidden: torch.Tensor | None = None  # hidden state that produced the pending token
        self.slot: int = -1                            # row in the worker's per-request state tensors
        # its prompt ran, but its first token is still on the device (Worker.launch_prefill(join=True)):
        # it decodes from the device step's pools (root token, hidden state) until the token is read
        self.joining = False
        self.verify_ct = 0
        self.accepted_tokens = 0                       # drafted tokens accepted, summed over steps
        self.tree_counts: dict[str, int] = {}
        self.lookup = None                             # spec/lookup.py LookupIndex when prompt lookup is on
        self.lookup_accepted = 0                       # accepted tokens that came from the lookup branch
        self.entropy_sum = 0.0
        self.entropy_n = 0
        # timing (engine clock)
        self.t_arrival = 0.0
        self.t_first_token: float | None = None
        self.t_last_token: float | None = None
        self.stream_text_sent = 0                      # characters of text already streamed
        # incremental detokenisation (detokenizer.py): confirmed text and its token offsets
        self.detok_text = ""
        self.detok_prefix = 0
        self.detok_read = 0
        self.aborted = False

    @property
    def kv_slots(self) -> torch.Tensor:
        """The KV slots of the tokens cached so far, in order (a LongTensor view: appends do not
        change a view taken before them)."""
        return torch.from_numpy(self._kv[: self._kv_n])

    @kv_slots.setter
    def kv_slots(self, slots: torch.Tensor) -> None:
        self._kv = np.array(slots, dtype=np.int64)  # a copy: the caller's tensor stays its own
        self._kv_n = self._kv.size

    @property
    def kv_array(self) -> np.ndarray:
        """The same slots as a numpy view, for host bookkeeping without torch's per-op cost."""
        return self._kv[: self._kv_n]

    @property
    def num_kv(self) -> int:
        return self._kv_n

    def append_kv(self, slots: torch.Tensor | np.ndarray) -> None:
        """Add slots of newly cached tokens (a host tensor or array) after the others."""
        a = slots.numpy() if isinstance(slots, torch.Tensor) else slots
        n = self._kv_n + a.size
        if n > self._kv.size:  # grow geometrically: appends are amortised O(1)
            grown = np.empty(max(n, 2 * self._kv.size, 64), dtype=np.int64)
            grown[: self._kv_n] = self._kv[: self._kv_n]
            self._kv = grown
        self._kv[self._kv_n: n] = a
        self._kv_n = n

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending_token(self) -> int:
        """The newest token: produced but its KV not yet computed (the next step's input / tree root)."""
        return self.output_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def meta_info(self) -> dict:
        steps = max(self.verify_ct, 1)
        return {
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.output_ids),
            "finish_reason": self.finish_reason,
            "spec_verify_ct": self.verify_ct,
            # SGLang's definition: tokens emitted per verify step (accepted drafts + the bonus token)
            "spec_accept_length": (self.accepted_tokens + self.verify_ct) / steps if self.verify_ct else 0.0,
            "task": self.task,
            "tree_choices": dict(self.tree_counts),
            "lookup_accepted_tokens": self.lookup_accepted,
            "mean_entropy": self.entropy_sum / self.entropy_n if self.entropy_n else None,
        }
