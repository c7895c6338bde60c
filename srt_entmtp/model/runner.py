"""ModelRunner: weights + KV pool + attention backend; runs one ForwardBatch.

The only object above the model that touches tensors of the model's shape. The scheduler and
the speculative worker build ForwardBatches (and allocate KV slots through `runner.kv`); the
runner plans the backend, runs the layers and returns hidden states and logits.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from srt_entmtp.model.attention import create_backend
from srt_entmtp.model.config import ModelConfig
from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.model.kv_cache import KVPool
from srt_entmtp.model.llama import LlamaModel
from srt_entmtp.model.loader import load_config, load_state_dict, resolve_model_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # this CPU class (AVX2, no AVX512-BF16/AMX) runs bf16 matmuls ~6x slower than fp32
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class ForwardOutput:
    hidden: torch.Tensor   # [M, hidden] final-normed hidden states of the selected tokens
    logits: torch.Tensor   # [M, vocab] float32


class ModelRunner:
    def __init__(self, model_path: str | Path | None = None, *, dtype: str = "auto", device: str = "auto",
                 attention_backend: str = "auto", context_length: int | None = None, kv_slots: int | None = None):
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.model_dir = resolve_model_path(model_path)
        self.config: ModelConfig = load_config(self.model_dir)
        self.dtype = resolve_dtype(dtype, self.device)
        self.context_length = min(context_length or self.config.max_position_embeddings,
                                  self.config.max_position_embeddings)
        t0 = time.perf_counter()
        state = load_state_dict(self.model_dir)
        self.model = LlamaModel(self.config, state, self.dtype, self.device, max_positions=self.context_length + 64)
        self.load_seconds = time.perf_counter() - t0
        cfg = self.config
        if kv_slots is None:
            kv_slots = max(4 * self.context_length, 16384) if self.device.type == "cpu" else 256 * 1024
        self.kv = KVPool(cfg.num_layers, kv_slots, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device)
        if attention_backend == "auto":
            attention_backend = self._default_backend()
        self.backend_name = attention_backend
        self.attn = create_backend(attention_backend, self.kv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.graphs = None  # CudaGraphRunner once capture_cuda_graphs() ran
        log.info("loaded %s (%s, %s, %s attention) in %.1fs; KV pool %d slots (%.0f MiB)", self.model_dir,
                 cfg.model_type, self.dtype, attention_backend, self.load_seconds, kv_slots, self.kv.bytes() / 2**20)

    def _default_backend(self) -> str:
        if self.device.type != "cuda":
            return "sdpa"
        import importlib.util

        if importlib.util.find_spec("srt_entmtp.model.attention.flashinfer") is None:
            return "sdpa"  # the FlashInfer backend is not part of this build yet
        if importlib.util.find_spec("flashinfer") is None:
            log.warning("flashinfer is not installed; using the sdpa attention backend (pip install .[gpu])")
            return "sdpa"
        return "flashinfer"

    @property
    def name(self) -> str:
        """The served model's name (its directory), which draft heads and libraries are keyed on."""
        return self.model_dir.name

    def capture_cuda_graphs(self, max_batch: int, max_tree_nodes: int = 0, decode: bool = True,
                            decode_attention: str = "auto", prefill_tokens: int = 0,
                            prefill_beside: bool = False) -> bool:
        """Capture decode graphs (if `decode`), tree-verify graphs for trees of up to
        max_tree_nodes nodes (if > 0), for batches up to max_batch, and prompt-chunk graphs for
        chunks of up to prefill_tokens tokens (if > 0). CUDA with FlashInfer only.
        decode_attention: auto = the decode graphs attend with the Triton tree kernel where
        Triton imports; flashinfer = FlashInfer's decode wrapper. prefill_beside: prompt-chunk
        graphs get their own pool, workspace and capture stream, so that a chunk may run on a side
        stream beside the step graphs (Worker.launch_prefill; off: they share the others')."""
        if self.device.type != "cuda" or self.backend_name != "flashinfer":
            log.info("CUDA graphs are off: they need a CUDA device and the flashinfer backend (have %s, %s)",
                     self.device, self.backend_name)
            return False
        from srt_entmtp.model.cuda_graph import CudaGraphRunner

        graphs = CudaGraphRunner(self, max_batch, max_tree_nodes, decode, decode_attention, prefill_tokens,
                                 prefill_beside)
        graphs.capture()
        self.graphs = graphs
        return True

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, input_ids: torch.Tensor | None = None) -> ForwardOutput:
        """Hidden states and logits of one ForwardBatch. After a graph replay they are views of
        static buffers, valid until the next forward: copy what must outlive the step.
        input_ids: the token ids as a device tensor, in place of the batch's (a step fed by the
        one before it on the device)."""
        if self.graphs is not None:
            out = self.graphs.forward(batch, input_ids)
            if out is not None:
                return ForwardOutput(hidden=out[0], logits=out[1])
        batch = batch.to(self.device)  # built on the host for a graph that did not fit
        if input_ids is not None:
            batch = dataclasses.replace(batch, input_ids=input_ids)
        self.attn.plan(batch)
        hidden = self.model.forward(batch.input_ids, batch.positions, self.attn, batch.logits_indices)
        return ForwardOutput(hidden=hidden, logits=self.model.logits(hidden))
