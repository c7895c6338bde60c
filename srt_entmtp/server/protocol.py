"""Request and response models of the HTTP API (OpenAI-compatible, plus SGLang-style /generate).

Requests accept what OpenAI clients send. Unknown top-level fields are ignored (clients add new
harmless ones all the time), except those that would change the result in a way we do not
implement: `check_supported()` rejects them with a 400 naming the field. Fields whose JSON type
is a union (content, prompt, stop) are normalised by before-validators so that a wrong type gives
one clear message naming the field, not one error per union member.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator, model_serializer

from srt_entmtp.sched.request import SpecOptions
from srt_entmtp.server.errors import bad_request

TASKS = ("code", "math", "chat", "writing", "general")
POLICIES = ("entmtp", "static", "confidence", "none")
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


# ---- shared field normalisers ---------------------------------------------------------------------
def _norm_stop(v: Any) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError("stop must be a string or a list of strings")
    if any(s == "" for s in v):
        raise ValueError("stop strings must not be empty")
    return v


def _norm_content(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list):
        texts = []
        for i, part in enumerate(v):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"content part {i} ({kind!s}) is not supported: only "
                                 '{"type": "text", "text": "..."} parts are')
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError("content must be a string or a list of text parts")


def _is_ids(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _norm_prompt(v: Any) -> str | list[int]:
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        if len(v) == 1 and isinstance(v[0], (str, list)):
            inner = v[0]
            if isinstance(inner, str) or _is_ids(inner):
                return inner
        elif _is_ids(v):
            return list(v)
        elif len(v) > 1 and all(isinstance(x, str) or _is_ids(x) for x in v):
            raise ValueError("batched prompts are not supported: send one prompt per request")
    raise ValueError("prompt must be a string, a list of one string, or a list of token ids")


StopField = Annotated[list[str] | None, BeforeValidator(_norm_stop)]


class EntMTPOptions(BaseModel):
    """The `entmtp` extension object: per-request speculative-decoding options."""
    model_config = ConfigDict(extra="forbid")

    task: Literal["code", "math", "chat", "writing", "general"] | None = Field(
        None, description="task family whose trees to use; default: classify the prompt")
    policy: Literal["entmtp", "static", "confidence", "none"] | None = Field(
        None, description="tree policy; default: the server's --speculative-algorithm")
    tree: str | None = Field(None, description="a tree-library tree name (for policy=static)")

    def to_spec(self) -> SpecOptions:
        return SpecOptions(task=self.task, policy=self.policy, tree=self.tree)


# Fields that would change results in ways we do not implement: name -> (is it set?, why it is refused)
_UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (lambda v: v not in (None, False), "logprobs are not supported"),
    "top_logprobs": (lambda v: v not in (None, 0), "logprobs are not supported"),
    "prompt_logprobs": (lambda v: v is not None, "logprobs are not supported"),
    "return_logprob": (lambda v: bool(v), "logprobs are not supported"),
    "tools": (lambda v: bool(v), "tool calling is not supported"),
    "functions": (lambda v: bool(v), "function calling is not supported"),
    "tool_choice": (lambda v: v not in (None, "none", "auto"), "tool calling is not supported"),
    "function_call": (lambda v: v not in (None, "none", "auto"), "function calling is not supported"),
    "response_format": (lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
                        "only response_format {\"type\": \"text\"} is supported"),
    "logit_bias": (lambda v: bool(v), "logit_bias is not supported"),
    "audio": (lambda v: v is not None, "audio output is not supported"),
    "modalities": (lambda v: v not in (None, ["text"]), "only the text modality is supported"),
    "echo": (lambda v: bool(v), "echo is not supported"),
    "suffix": (lambda v: bool(v), "suffix (insertion) is not supported"),
    "best_of": (lambda v: v not in (None, 1), "best_of other than 1 is not supported"),
    "repetition_penalty": (lambda v: v not in (None, 1, 1.0), "repetition_penalty is not supported (only 1)"),
    "min_p": (lambda v: v not in (None, 0, 0.0), "min_p is not supported (only 0)"),
    "min_tokens": (lambda v: v not in (None, 0), "min_tokens is not supported (only 0)"),
    "min_new_tokens": (lambda v: v not in (None, 0), "min_new_tokens is not supported (only 0)"),
    "guided_json": (lambda v: v is not None, "guided decoding is not supported"),
    "guided_regex": (lambda v: v is not None, "guided decoding is not supported"),
    "guided_choice": (lambda v: v is not None, "guided decoding is not supported"),
    "guided_grammar": (lambda v: v is not None, "guided decoding is not supported"),
    "json_schema": (lambda v: v is not None, "constrained decoding is not supported"),
    "regex": (lambda v: v is not None, "constrained decoding is not supported"),
    "ebnf": (lambda v: v is not None, "constrained decoding is not supported"),
}


class _Checked(BaseModel):
    """Ignores unknown fields but refuses the result-changing ones listed in _UNSUPPORTED."""
    model_config = ConfigDict(extra="allow")

    def check_supported(self, prefix: str = "") -> None:
        values = dict(self.model_extra or {})
        for name in ("presence_penalty", "frequency_penalty", "n"):
            if name in type(self).model_fields:
                values[name] = getattr(self, name)
        for name, value in values.items():
            if name in ("presence_penalty", "frequency_penalty"):
                if value not in (None, 0, 0.0):
                    raise bad_request(f"{name} is not supported (only 0); got {value}", param=prefix + name,
                                      code="unsupported_parameter")
            elif name == "n":
                if value not in (None, 1):
                    raise bad_request(f"only n=1 is supported; got n={value}", param=prefix + name,
                                      code="unsupported_parameter")
            elif name in _UNSUPPORTED:
                is_set, why = _UNSUPPORTED[name]
                try:
                    refused = is_set(value)
                except Exception:  # noqa: BLE001 - a value the predicate can't read is refused
                    refused = True
                if refused:
                    raise bad_request(f"{why}: '{name}'", param=prefix + name, code="unsupported_parameter")


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _OpenAISampling(_Checked):
    """Sampling fields shared by /v1/chat/completions and /v1/completions."""
    model: str = Field(..., description="the served model name (see GET /v1/models)")
    max_tokens: int | None = Field(None, description="max tokens to generate")
    temperature: float | None = Field(None, description="0 = greedy; default 1")
    top_p: float | None = Field(None, description="nucleus sampling mass, (0, 1]; default 1")
    top_k: int | None = Field(None, description="extension: top-k sampling; 0 or -1 = off")
    stop: StopField = Field(None, description="a string or up to 16 strings that end generation")
    stop_token_ids: list[int] | None = Field(None, description="extension: token ids that end generation")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, description="seed for reproducible sampling")
    n: int | None = Field(None, description="only 1 is supported")
    ignore_eos: StrictBool = Field(False, description="extension: keep generating past the end-of-sequence token")
    presence_penalty: float | None = Field(None, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, description="only 0 is supported")
    user: str | None = None
    entmtp: EntMTPOptions | None = Field(None, description="extension: speculative-decoding options")

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v):
        if v is not None and not (SEED_MIN <= v <= SEED_MAX):
            raise ValueError("seed must fit in 64 bits")
        return v

    def check_supported(self, prefix: str = "") -> None:
        super().check_supported(prefix)
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# ---- /v1/chat/completions -------------------------------------------------------------------------
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | None, BeforeValidator(_norm_content)] = Field(None, validate_default=True)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, v, info):
        if v is None and info.data.get("role") != "assistant":
            raise ValueError(f"content is required for a {info.data.get('role', 'user')} message")
        return v

    def to_template(self) -> dict:
        # the chat templates of small open models know system/user/assistant only
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content or ""}


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(..., description="the conversation so far")
    max_completion_tokens: int | None = Field(None, description="max tokens to generate (newer name of max_tokens)")

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("messages must contain at least one message")
        return v


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    entmtp: dict | None = Field(None, description="extension: speculative-decoding statistics of this request")


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    entmtp: dict | None = None


# ---- /v1/completions ---------------------------------------------------------------------------------
class CompletionRequest(_OpenAISampling):
    prompt: Annotated[str | list[int], BeforeValidator(_norm_prompt)] = Field(
        ..., description="a string, a list of one string, or a list of token ids")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    entmtp: dict | None = None


# ---- /v1/models -------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "entmtp"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- native /generate (SGLang style) ----------------------------------------------------------------
class NativeSamplingParams(_Checked):
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(-1, description="0 or -1 = off")
    stop: StopField = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: StrictBool = False
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v):
        if v is not None and not (SEED_MIN <= v <= SEED_MAX):
            raise ValueError("seed must fit in 64 bits")
        return v


class GenerateRequest(_Checked):
    text: str | None = Field(None, description="the prompt text (no chat template is applied)")
    input_ids: list[int] | None = Field(None, description="the prompt as token ids (instead of text)")
    sampling_params: NativeSamplingParams = Field(default_factory=NativeSamplingParams)
    entmtp: EntMTPOptions | None = None
    stream: StrictBool = False


class GenerateMetaInfo(BaseModel):
    id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    spec_verify_ct: int = 0
    spec_accept_length: float = 0.0
    tree_choices: dict[str, int] = Field(default_factory=dict)
    lookup_accepted_tokens: int = 0
    mean_entropy: float | None = None
    task: str | None = None
    e2e_latency: float | None = None


class GenerateResponse(BaseModel):
    text: str
    output_ids: list[int]
    meta_info: GenerateMetaInfo
