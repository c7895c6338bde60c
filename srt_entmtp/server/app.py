"""The HTTP server: OpenAI-compatible endpoints, SGLang-style /generate, /health and /metrics.

Threading model: the engine runs its own loop thread. A request is tokenised and validated on the
asyncio side, then `engine.submit(req, gen.on_output)` queues it; `on_output` runs in the engine
thread after every step that touched the request, computes the text delta there (the detokeniser
keeps per-request state and must only be used from that thread) and hands it to the event loop
with `call_soon_threadsafe`. Each HTTP request watches its connection: a client that disconnects,
streaming or not, aborts its request so the KV cache it holds is freed at once.

Shutdown: the first SIGTERM/SIGINT starts a drain: /health and new requests answer 503, the engine
finishes every queued and running request (`engine.shutdown(drain=True)`), then uvicorn stops and
`serve` returns 0. A second SIGINT (Ctrl-C) stops at once (exit 1); repeated SIGTERMs are ignored.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from srt_entmtp.sched.request import ParamError, SamplingParams, SpecOptions
from srt_entmtp.sched.scheduler import QueueFullError
from srt_entmtp.server.errors import (
    INVALID_REQUEST,
    SERVER_ERROR,
    APIError,
    bad_request,
    error_body,
    install_error_handlers,
    unavailable,
)
from srt_entmtp.server.metrics import CONTENT_TYPE, ServerMetrics
from srt_entmtp.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    EntMTPOptions,
    GenerateMetaInfo,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)

log = logging.getLogger(__name__)

WATCHDOG_S = 2.0        # how often a waiting handler checks that the engine still owns its request
DRAIN_TIMEOUT_S = 120.0  # how long a drain may wait for running requests
SPEC_KEYS = ("spec_verify_ct", "spec_accept_length", "tree_choices", "lookup_accepted_tokens", "mean_entropy", "task")


# ---- the bridge from the engine thread to asyncio ----------------------------------------------------
@dataclass
class Item:
    delta: str
    new_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    meta: dict | None = None
    error: str | None = None


class Generation:
    """One request in flight. `on_output` runs in the engine thread; everything else on the loop."""

    def __init__(self, state: ServerState, req, t0: float):
        self.state = state
        self.engine = state.engine
        self.req = req
        self.rid = req.rid
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue[Item] = asyncio.Queue()
        self.t0 = t0
        self.t_first: float | None = None   # engine thread (metrics)
        self.t_last: float | None = None
        self.finished = False               # the final item has been consumed
        self.client_gone = False
        self._failed = False                # engine thread: an error item was already posted
        self._strikes = 0

    # -- engine thread --
    def on_output(self, out) -> None:
        if self._failed:
            return
        try:
            delta = self.engine.detok.delta(out.req)
            fin = bool(out.finished)
            item = Item(delta, list(out.new_ids), fin, out.req.finish_reason if fin else None,
                        out.req.meta_info() if fin else None)
        except Exception:
            log.exception("%s: turning engine output into text failed; aborting the request", self.rid)
            self._failed = True
            if not out.finished:
                self.engine.abort(self.rid)
            item = Item("", [], True, "abort", error="internal error while detokenising the output")
        try:
            self.state.metrics.on_output(self, out)
        except Exception:
            log.exception("metrics update failed")
        self._post(item)

    def _post(self, item: Item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    # -- event loop --
    def abort(self) -> None:
        if not self.finished:
            self.engine.abort(self.rid)

    def client_disconnected(self) -> None:
        if not self.client_gone:
            log.info("%s: client disconnected; aborting", self.rid)
        self.client_gone = True
        self.abort()

    def _lost(self) -> Item | None:
        """A final item that the engine will never send (its thread died, or it dropped the request)."""
        if self.state.start_engine and self.state.engine_started and not self.engine.alive:
            return Item("", [], True, "abort", error="the engine loop has stopped")
        if self.req.finished and self.req.finish_reason == "abort" and self.q.empty():
            self._strikes += 1
            if self._strikes >= 2:
                return Item("", [], True, "abort", error="the engine dropped the request")
        return None

    async def items(self):
        """The request's outputs, ending with the finished one. Leaving early aborts the request."""
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self.q.get(), WATCHDOG_S)
                except asyncio.TimeoutError:
                    item = self._lost()
                    if item is None:
                        continue
                if item.finished:
                    self.finished = True
                yield item
                if item.finished:
                    return
        finally:
            self.state.active.pop(self.rid, None)
            self.abort()

    async def collect(self, receive) -> tuple[str, list[int], Item | None]:
        """Wait for the whole output (non-streaming), aborting if the client goes away meanwhile."""
        watcher = asyncio.create_task(_watch_disconnect(receive, self))
        parts: list[str] = []
        ids: list[int] = []
        last = None
        try:
            async for item in self.items():
                parts.append(item.delta)
                ids.extend(item.new_ids)
                last = item
        finally:
            watcher.cancel()
        return "".join(parts), ids, last


async def _watch_disconnect(receive, gen: Generation) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gen.client_disconnected()
            return


class EventStream(Response):
    """Server-sent events that abort their request when the client disconnects."""
    media_type = "text/event-stream"

    def __init__(self, body, gen: Generation):
        self.body_iter = body
        self.gen = gen
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.create_task(_watch_disconnect(receive, self.gen))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iter:
                if self.gen.client_gone:
                    break
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            if not self.gen.client_gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            self.gen.client_disconnected()
        finally:
            watcher.cancel()
            await self.body_iter.aclose()


def _sse(obj) -> str:
    if isinstance(obj, str):  # already JSON
        return f"data: {obj}\n\n"
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def _failure(item: Item | None) -> APIError:
    msg = (item.error if item and item.error else "the request was aborted by the engine") + \
        " (details are in the server log)"
    return APIError(500, msg, type=SERVER_ERROR, code="aborted")


def _usage(meta: dict | None, prompt_len: int, completion_len: int) -> UsageInfo:
    p = meta["prompt_tokens"] if meta else prompt_len
    c = meta["completion_tokens"] if meta else completion_len
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _spec_stats(meta: dict | None) -> dict | None:
    return {k: meta.get(k) for k in SPEC_KEYS} if meta else None


def _sampling(*, temperature, top_p, top_k, seed, max_new, stop, stop_token_ids, ignore_eos) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        top_k=0 if top_k in (None, -1) else int(top_k),
        seed=seed, max_new_tokens=int(max_new), stop=list(stop or []),
        stop_token_ids=list(stop_token_ids or []), ignore_eos=bool(ignore_eos))


def _spec(opts: EntMTPOptions | None) -> SpecOptions | None:
    return opts.to_spec() if opts is not None else None


# ---- server state ----------------------------------------------------------------------------------------
class ServerState:
    def __init__(self, engine, model_name: str, start_engine: bool):
        self.engine = engine
        self.model_name = model_name
        self.start_engine = start_engine
        self.engine_started = not start_engine
        self.metrics = ServerMetrics(engine)
        engine.step_listeners.append(self.metrics.on_step)
        self.ready = False
        self.draining = False
        self.forced = False
        self.drain_timeout = DRAIN_TIMEOUT_S
        self.active: dict[str, Generation] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.created = int(time.time())
        cfg = getattr(getattr(engine, "runner", None), "config", None)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or len(engine.tokenizer))

    def check_accepting(self) -> None:
        if self.draining:
            raise unavailable("the server is shutting down; retry on another replica", "shutting_down")
        if not self.ready:
            raise unavailable("the server is starting", "starting")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           type=INVALID_REQUEST, param="model", code="model_not_found")

    def start(self, prompt_ids: list[int], sampling: SamplingParams, spec: SpecOptions | None, rid: str, t0: float,
              *, prompt_param: str, max_param: str, prefix: str = "") -> Generation:
        """Validate and queue one request; raises APIError (400/503) when it cannot run."""
        eng = self.engine
        self.check_accepting()
        n = len(prompt_ids)
        if n == 0:
            raise bad_request("the prompt is empty", param=prompt_param)
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range: the vocabulary has {self.vocab_size} tokens",
                              param=prompt_param)
        if n >= eng.context_length:
            raise bad_request(f"this model's context length is {eng.context_length} tokens and the prompt has {n} "
                              "tokens, leaving no room to generate", param=prompt_param,
                              code="context_length_exceeded")
        try:
            req = eng.make_request(prompt_ids, sampling, spec, rid=rid)
        except ParamError as e:
            names = {"prompt": prompt_param, "max_tokens": max_param}
            msg = str(e)
            if e.param == "max_tokens" and max_param != "max_tokens":
                msg = msg.replace("max_tokens", max_param.rsplit(".", 1)[-1])
            code = "context_length_exceeded" if "context length" in msg else "invalid_value"
            raise bad_request(msg, param=names.get(e.param, prefix + e.param), code=code) from None
        kv = eng.runner.kv
        need = n + sampling.max_new_tokens + eng.worker.max_new_slots_per_step()
        if need > kv.num_slots:  # the scheduler would drop it at admission
            raise bad_request(f"the prompt ({n} tokens) and {max_param.rsplit('.', 1)[-1]} "
                              f"({sampling.max_new_tokens}) need {need} KV-cache slots; this server's KV cache "
                              f"has {kv.num_slots}", param=max_param, code="context_length_exceeded")
        gen = Generation(self, req, t0)
        try:
            eng.submit(req, gen.on_output)
        except QueueFullError as e:
            if self.draining or "shutting down" in str(e):
                raise unavailable("the server is shutting down; retry on another replica", "shutting_down") from None
            raise unavailable(f"the server is busy ({e}); retry later", "queue_full") from None
        self.active[rid] = gen
        return gen

    def fail_all(self, message: str) -> None:
        """Thread-safe: end every request still in flight with an error (the engine has stopped)."""
        for gen in list(self.active.values()):
            gen._post(Item("", [], True, "abort", error=message))

    def begin_drain(self, on_done, timeout: float | None = None) -> bool:
        """Stop taking requests, let the engine finish the ones it has, then call on_done (any thread)."""
        if self.draining:
            return False
        self.draining = True

        def run():
            try:
                self.engine.shutdown(drain=True, timeout=timeout or self.drain_timeout)
            except Exception:  # the drain must reach on_done whatever happens
                log.exception("engine shutdown failed")
            self.fail_all("the server stopped before the request finished")
            log.info("drained; stopping the HTTP server")
            on_done()

        threading.Thread(target=run, name="entmtp-drain", daemon=True).start()
        return True


# ---- the app -------------------------------------------------------------------------------------------------
def create_app(engine, served_model_name: str | None = None, *, start_engine: bool = True) -> FastAPI:
    """The FastAPI app around a loaded Engine. With start_engine the app's lifespan starts the engine's
    loop thread and drains it on shutdown; otherwise the caller owns the engine's lifecycle."""
    state = ServerState(engine, served_model_name or engine.model_name, start_engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.loop = asyncio.get_running_loop()
        if start_engine:
            engine.start()
            state.engine_started = True
        state.ready = True
        yield
        state.ready = False
        state.draining = True
        if start_engine:
            await state.loop.run_in_executor(None, functools.partial(
                engine.shutdown, drain=not state.forced, timeout=state.drain_timeout))
        state.fail_all("the server stopped before the request finished")

    app = FastAPI(title="EntMTP server", summary="OpenAI-compatible LLM server with entropy-adaptive tree "
                  "speculative decoding", version="0.1.0", lifespan=lifespan)
    app.state.entmtp = state
    install_error_handlers(app)

    # -- info --
    @app.get("/health")
    async def health():
        if state.draining:
            raise unavailable("the server is shutting down", "shutting_down")
        if not state.ready:
            raise unavailable("the server is starting", "starting")
        if state.engine_started and start_engine and not engine.alive:
            return JSONResponse(error_body("the engine loop has stopped", SERVER_ERROR, code="engine_dead"),
                                status_code=503)
        return {"status": "ok", "model": state.model_name}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[_card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str):
        state.check_model(model_id)
        return _card()

    def _card() -> ModelCard:
        return ModelCard(id=state.model_name, created=state.created, max_model_len=engine.context_length)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    # -- OpenAI chat --
    @app.post("/v1/chat/completions", response_model=None,
              responses={200: {"model": ChatCompletionResponse, "description": "the completion, or an SSE stream "
                               "of chat.completion.chunk objects when stream is true"}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        t0 = time.monotonic()
        state.check_accepting()
        state.check_model(body.model)
        body.check_supported()
        try:
            prompt_ids = engine.tokenize_chat([m.to_template() for m in body.messages])
        except Exception as e:  # noqa: BLE001 - a template may refuse a conversation (e.g. role order)
            raise bad_request(f"the messages could not be rendered with the model's chat template: {e}",
                              param="messages") from None
        use_mct = body.max_completion_tokens is not None
        max_param = "max_completion_tokens" if use_mct else "max_tokens"
        max_new = body.max_completion_tokens if use_mct else body.max_tokens
        if max_new is None:  # OpenAI: as many as the context allows
            max_new = max(engine.context_length - len(prompt_ids), 1)
        sampling = _sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                             max_new=max_new, stop=body.stop, stop_token_ids=body.stop_token_ids,
                             ignore_eos=body.ignore_eos)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = state.start(prompt_ids, sampling, _spec(body.entmtp), rid, t0, prompt_param="messages",
                          max_param=max_param)
        created = int(time.time())
        if body.stream:
            return EventStream(_chat_stream(gen, created, body.include_usage), gen)
        text, ids, last = await gen.collect(request.receive)
        if gen.client_gone:
            return Response(status_code=499)
        if last is None or last.finish_reason not in ("stop", "length"):
            raise _failure(last)
        resp = ChatCompletionResponse(
            id=rid, created=created, model=state.model_name,
            choices=[ChatChoice(message=ChatMessageOut(content=text), finish_reason=last.finish_reason)],
            usage=_usage(last.meta, len(prompt_ids), len(ids)), entmtp=_spec_stats(last.meta))
        return JSONResponse(resp.model_dump())

    async def _chat_stream(gen: Generation, created: int, include_usage: bool):
        exclude = set() if include_usage else {"usage"}

        def chunk(delta: DeltaMessage, finish=None, entmtp=None) -> str:
            c = ChatCompletionChunk(id=gen.rid, created=created, model=state.model_name,
                                    choices=[ChatChunkChoice(delta=delta, finish_reason=finish)], entmtp=entmtp)
            return _sse(c.model_dump_json(exclude=exclude | ({"entmtp"} if entmtp is None else set())))

        def usage_chunk(usage) -> str:
            c = ChatCompletionChunk(id=gen.rid, created=created, model=state.model_name, choices=[], usage=usage)
            return _sse(c.model_dump_json(exclude={"entmtp"}))

        def text_chunk(text: str, finish=None, entmtp=None) -> str:
            return chunk(DeltaMessage(content=text) if text else DeltaMessage(), finish, entmtp)

        yield chunk(DeltaMessage(role="assistant", content=""))
        async for line in _openai_stream(gen, include_usage, text_chunk, usage_chunk):
            yield line

    async def _openai_stream(gen: Generation, include_usage: bool, chunk, usage_chunk):
        """The body of an OpenAI SSE stream: text deltas, the finish chunk, the usage chunk, [DONE]."""
        n_out = 0
        async for item in gen.items():
            n_out += len(item.new_ids)
            if item.finished and item.finish_reason not in ("stop", "length"):
                yield _sse(_failure(item).body())
                break
            if item.delta:
                yield chunk(item.delta)
            if item.finished:
                yield chunk("", item.finish_reason, _spec_stats(item.meta))
                if include_usage:
                    yield usage_chunk(_usage(item.meta, len(gen.req.prompt_ids), n_out))
        yield DONE

    # -- OpenAI completions --
    @app.post("/v1/completions", response_model=None,
              responses={200: {"model": CompletionResponse, "description": "the completion, or an SSE stream of "
                               "text_completion chunks when stream is true"}})
    async def completions(body: CompletionRequest, request: Request):
        t0 = time.monotonic()
        state.check_accepting()
        state.check_model(body.model)
        body.check_supported()
        prompt_ids = engine.tokenize(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        max_new = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for this endpoint
        sampling = _sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                             max_new=max_new, stop=body.stop, stop_token_ids=body.stop_token_ids,
                             ignore_eos=body.ignore_eos)
        rid = f"cmpl-{uuid.uuid4().hex}"
        gen = state.start(prompt_ids, sampling, _spec(body.entmtp), rid, t0, prompt_param="prompt",
                          max_param="max_tokens")
        created = int(time.time())
        if body.stream:
            return EventStream(_completion_stream(gen, created, body.include_usage), gen)
        text, ids, last = await gen.collect(request.receive)
        if gen.client_gone:
            return Response(status_code=499)
        if last is None or last.finish_reason not in ("stop", "length"):
            raise _failure(last)
        resp = CompletionResponse(id=rid, created=created, model=state.model_name,
                                  choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)],
                                  usage=_usage(last.meta, len(prompt_ids), len(ids)), entmtp=_spec_stats(last.meta))
        return JSONResponse(resp.model_dump())

    async def _completion_stream(gen: Generation, created: int, include_usage: bool):
        exclude = set() if include_usage else {"usage"}

        def chunk(text: str, finish=None, entmtp=None) -> str:
            c = CompletionResponse(id=gen.rid, created=created, model=state.model_name,
                                   choices=[CompletionChoice(text=text, finish_reason=finish)], entmtp=entmtp)
            return _sse(c.model_dump_json(exclude=exclude | ({"entmtp"} if entmtp is None else set())))

        def usage_chunk(usage) -> str:
            c = CompletionResponse(id=gen.rid, created=created, model=state.model_name, choices=[], usage=usage)
            return _sse(c.model_dump_json(exclude={"entmtp"}))

        async for line in _openai_stream(gen, include_usage, chunk, usage_chunk):
            yield line

    # -- native (SGLang style) --
    @app.post("/generate", response_model=None,
              responses={200: {"model": GenerateResponse, "description": "the generation, or an SSE stream of "
                               "cumulative {text, output_ids, meta_info} objects when stream is true"}})
    async def generate(body: GenerateRequest, request: Request):
        t0 = time.monotonic()
        state.check_accepting()
        body.check_supported()
        sp = body.sampling_params
        sp.check_supported(prefix="sampling_params.")
        if (body.text is None) == (body.input_ids is None):
            raise bad_request("give exactly one of 'text' or 'input_ids'", param="text")
        if body.text is not None:
            prompt_ids, prompt_param = engine.tokenize(body.text), "text"
        else:
            prompt_ids, prompt_param = list(body.input_ids), "input_ids"
        sampling = _sampling(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, seed=sp.seed,
                             max_new=sp.max_new_tokens, stop=sp.stop, stop_token_ids=sp.stop_token_ids,
                             ignore_eos=sp.ignore_eos)
        rid = f"gen-{uuid.uuid4().hex}"
        gen = state.start(prompt_ids, sampling, _spec(body.entmtp), rid, t0, prompt_param=prompt_param,
                          max_param="sampling_params.max_new_tokens", prefix="sampling_params.")
        if body.stream:
            return EventStream(_generate_stream(gen), gen)
        text, ids, last = await gen.collect(request.receive)
        if gen.client_gone:
            return Response(status_code=499)
        if last is None or last.finish_reason not in ("stop", "length"):
            raise _failure(last)
        return JSONResponse(GenerateResponse(text=text, output_ids=ids,
                                             meta_info=_native_meta(gen, last, len(ids))).model_dump())

    def _native_meta(gen: Generation, item: Item | None, n_out: int) -> GenerateMetaInfo:
        meta = dict(item.meta) if item and item.meta else {
            "prompt_tokens": len(gen.req.prompt_ids), "completion_tokens": n_out, "finish_reason": None}
        meta = {k: v for k, v in meta.items() if k in GenerateMetaInfo.model_fields}
        meta["id"] = gen.rid
        if item is not None and item.finished:
            meta["e2e_latency"] = time.monotonic() - gen.t0
        return GenerateMetaInfo(**meta)

    async def _generate_stream(gen: Generation):
        text, ids = "", []
        async for item in gen.items():
            if item.finished and item.finish_reason not in ("stop", "length"):
                yield _sse(_failure(item).body())
                break
            text += item.delta
            ids.extend(item.new_ids)
            if item.delta or item.finished:
                out = GenerateResponse(text=text, output_ids=ids, meta_info=_native_meta(gen, item, len(ids)))
                yield _sse(out.model_dump_json())
        yield DONE

    return app


# ---- serve ---------------------------------------------------------------------------------------------------
def _curl_line(host: str, port: int, model: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    # bounded: without max_tokens a request may run to the context length (OpenAI's semantics)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 64})
    return f"curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"


def serve(ns) -> int:
    """`entmtp serve`: load the engine, serve HTTP until SIGTERM/SIGINT, drain, return 0."""
    import uvicorn

    from srt_entmtp.cli import engine_args_from
    from srt_entmtp.engine import Engine

    try:  # the *_created series only clutter /metrics (process-wide setting, so only here)
        from prometheus_client import disable_created_metrics

        disable_created_metrics()
    except ImportError:
        pass
    engine = Engine(engine_args_from(ns))
    name = getattr(ns, "served_model_name", None) or engine.model_name
    app = create_app(engine, name)
    state: ServerState = app.state.entmtp
    state.drain_timeout = float(getattr(ns, "drain_timeout", None) or DRAIN_TIMEOUT_S)

    class DrainingServer(uvicorn.Server):
        signals = 0

        def handle_exit(self, sig, frame) -> None:  # replaces uvicorn's: drain first, exit 0
            self.signals += 1
            if self.signals == 1:
                log.warning("signal %d: draining (new requests get 503, running ones finish); "
                            "press Ctrl-C again to stop at once", sig)
                state.begin_drain(self._drained)
            elif sig == signal.SIGINT:
                log.warning("SIGINT again: stopping now without finishing running requests")
                state.forced = True
                self.should_exit = True
                self.force_exit = True
            else:
                log.info("signal %d: already draining", sig)

        def _drained(self) -> None:
            self.should_exit = True

    log_level = str(getattr(ns, "log_level", "info")).lower()
    if log_level not in uvicorn.config.LOG_LEVELS:
        log_level = "info"
    config = uvicorn.Config(app, host=ns.host, port=ns.port, log_level=log_level, timeout_graceful_shutdown=None,
                            lifespan="on")
    server = DrainingServer(config)
    print(_curl_line(ns.host, ns.port, name), flush=True)
    server.run()
    return 1 if state.forced else 0
