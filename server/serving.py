"""The two generation endpoints: /v1/chat/completions and /v1/completions.

A request goes: parse (strict pydantic) -> check the model name -> build the
prompt token ids -> check lengths -> one SamplingParams per choice (seed+k
for choice k) -> a GenerationJob (admission errors become 400/429 before
any byte is sent) -> either one JSON answer or an SSE stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import AsyncIterator, Callable

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from dspark_serve.engine import RequestOutput, SamplingParams, apply_chat_template

from dspark_serve.engine.structured import GrammarError, GrammarSpec

from . import protocol as P
from . import reasoning as R
from . import tools as T
from .errors import APIError, from_engine_error, from_validation_errors
from .generation import GenerationJob, JobAborted, SubRequest
from .lifecycle import Lifecycle
from .metrics import ServerMetrics
from .middleware import AccessRecord, access_record

log = logging.getLogger(__name__)


class SSEResponse(StreamingResponse):
    """text/event-stream whose job is closed however the response ends.

    The body generator's own `finally` does not run if the client leaves
    before the first chunk (the generator never started), so the response
    closes the job itself as well.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    def __init__(self, engine, model_name: str, metrics: ServerMetrics, lifecycle: Lifecycle, settings):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.settings = settings  # app.ServerSettings: limits, timeout, Retry-After
        self.queue_retry_after = settings.queue_retry_after
        # Test-only fault hook (DSPARK_FAULT_INJECTION=1): the body field `dspark_fault` arms it.
        self.faults = getattr(engine, "faults", None)
        self.tokenizer = engine.tokenizer
        self.token_text = P.TokenText(engine.tokenizer)
        self.vocab_size = engine.vocab_size
        self.chat_template = settings.chat_template  # None: the model's
        self.reasoning_parser = settings.reasoning_parser
        from dspark_serve.models.loader import sampling_defaults

        self.sampling_defaults = (sampling_defaults(getattr(engine, "model_path", None))
                                  if settings.generation_config == "auto" else {})

    # ------------------------------------------------------------ chat

    async def chat(self, request: Request):
        rec = access_record(request)
        self.lifecycle.check_admitting()
        req = await self._parse(request, P.ChatCompletionRequest)
        self._note(rec, req)
        self._check_fields(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs", code="invalid_value")
        tools = T.tool_set(req.tools, req.tool_choice, req.parallel_tool_calls)
        spec = self._grammar_spec(req, tools)
        messages = [self._message_dict(m, i) for i, m in enumerate(req.messages)]
        prompt_ids = await asyncio.to_thread(self._chat_prompt, messages, tools, req.chat_template_kwargs)
        self._check_length(len(prompt_ids), req.output_limit, "messages")
        rec.prompt_tokens = len(prompt_ids)
        params = await self._constrained(self._sampling_params(req, req.num_logprobs), spec)
        subs = [SubRequest(k, f"chatcmpl-{rec.request_id}-{k}", prompt_ids, self._seeded(params, k))
                for k in range(req.n)]
        job = await self._start(subs, "messages", req)
        rid, created = f"chatcmpl-{rec.request_id}", P.now()
        parses = tools is not None and tools.parses
        if req.stream:
            events = self._chat_events(job, req, rid, created, len(prompt_ids), rec, tools if parses else None)
            return SSEResponse(self._sse_stream(events, job, rec), job.close)
        finals = await self._wait(request, job)
        choices, completion_tokens = [], 0
        for k in range(req.n):
            comp = finals[k].outputs[0]
            completion_tokens += len(comp.token_ids)
            lp = P.chat_logprobs(comp.logprobs or [], self.token_text, req.top_logprobs or 0) if req.logprobs else None
            content, calls, finish, reasoning = comp.text, None, comp.finish_reason, None
            if self.reasoning_parser is not None:
                reasoning, content = R.split(content, self.reasoning_parser)
            if parses:
                content, calls = T.parse(content or "", tools, f"{rid}-{k}")
                if calls and finish == "stop":
                    finish = "tool_calls"
            choices.append(P.chat_choice(k, content, finish, lp, calls, reasoning, self.reasoning_parser is not None))
        self._note_finish(rec, finals, completion_tokens)
        return JSONResponse(P.chat_response(rid, created, self.model_name, choices,
                                            P.usage(len(prompt_ids), completion_tokens, P.cached_tokens(finals, req.n))))

    async def _chat_events(self, job: GenerationJob, req: P.ChatCompletionRequest, rid: str, created: int,
                           prompt_tokens: int, rec: AccessRecord, tools: T.ToolSet | None = None) -> AsyncIterator[dict]:
        with_usage = req.include_usage
        parsers = {k: T.StreamParser(tools, f"{rid}-{k}") for k in range(req.n)} if tools is not None else None
        thinking = ({k: R.StreamSplitter(self.reasoning_parser) for k in range(req.n)}
                    if self.reasoning_parser is not None else None)

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            return P.chat_chunk(rid, created, self.model_name, choices, usage, with_usage)

        # The first chunk of each choice carries the role, as OpenAI's do.
        for k in range(req.n):
            yield chunk([P.chat_chunk_choice(k, {"role": "assistant", "content": ""})])
        completion_tokens = 0
        finals: dict[int, RequestOutput] = {}
        async for k, out in job.outputs():
            comp = self._checked(out).outputs[0]
            completion_tokens += len(comp.delta_token_ids)
            lp = None
            if req.logprobs and comp.delta_logprobs:
                lp = P.chat_logprobs(comp.delta_logprobs, self.token_text, req.top_logprobs or 0)
            finish = comp.finish_reason if out.finished else None
            if out.finished:
                finals[k] = out
            if parsers is not None or thinking is not None:
                # reasoning, then tool calls: deltas of each kind, from the text so far
                pieces = ([("content", comp.delta_text)] if thinking is None
                          else thinking[k].feed(comp.delta_text, final=finish is not None))
                deltas = []
                for kind, text in pieces:
                    if kind == "reasoning":
                        deltas.append({"reasoning_content": text})
                    elif parsers is None:
                        deltas.append({"content": text})
                    else:
                        deltas += [d for d in parsers[k].feed(text) if d]
                if parsers is not None and finish is not None:
                    deltas += [d for d in parsers[k].feed("", final=True) if d]
                if finish == "stop" and parsers is not None and parsers[k].num_calls:
                    finish = "tool_calls"
                for j, d in enumerate(deltas):
                    last = j == len(deltas) - 1
                    yield chunk([P.chat_chunk_choice(k, d, finish if last else None, lp if last else None)])
                if not deltas and (finish is not None or lp is not None):
                    yield chunk([P.chat_chunk_choice(k, {}, finish, lp)])
                continue
            if not comp.delta_text and lp is None and finish is None:
                continue  # e.g. a token that completes no character yet
            delta = {"content": comp.delta_text} if comp.delta_text or finish is None else {}
            yield chunk([P.chat_chunk_choice(k, delta, finish, lp)])
        self._note_finish(rec, finals, completion_tokens)
        if with_usage:
            yield chunk([], P.usage(prompt_tokens, completion_tokens, P.cached_tokens(finals, req.n)))

    # ------------------------------------------------------------ completions

    async def completions(self, request: Request):
        rec = access_record(request)
        self.lifecycle.check_admitting()
        req = await self._parse(request, P.CompletionRequest)
        self._note(rec, req)
        self._check_fields(req)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported (no prompt logprobs)",
                           param="echo", code="unsupported")
        prompts = await asyncio.to_thread(self._completion_prompts, req.prompt, req.output_limit)
        for _, ids in prompts:
            self._check_length(len(ids), req.output_limit, "prompt")
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        rec.prompt_tokens = prompt_tokens
        params = await self._constrained(self._sampling_params(req, req.num_logprobs), self._grammar_spec(req, None))
        subs, n = [], req.n
        for p, (_, ids) in enumerate(prompts):
            for k in range(n):
                i = p * n + k  # OpenAI's order: all choices of prompt 0, then prompt 1...
                subs.append(SubRequest(i, f"cmpl-{rec.request_id}-{i}", ids, self._seeded(params, k)))
        echo_texts = {s.index: self._prompt_text(prompts[s.index // n]) for s in subs} if req.echo else {}
        job = await self._start(subs, "prompt", req)
        rid, created = f"cmpl-{rec.request_id}", P.now()
        if req.stream:
            events = self._completion_events(job, req, rid, created, prompt_tokens, len(subs), echo_texts, rec)
            return SSEResponse(self._sse_stream(events, job, rec), job.close)
        finals = await self._wait(request, job)
        choices, completion_tokens = [], 0
        for i in range(len(subs)):
            comp = finals[i].outputs[0]
            completion_tokens += len(comp.token_ids)
            lp = None
            if req.logprobs is not None:
                lp = P.completion_logprobs(comp.logprobs or [], self.token_text, 0)
            choices.append(P.completion_choice(i, echo_texts.get(i, "") + comp.text, comp.finish_reason, lp))
        self._note_finish(rec, finals, completion_tokens)
        return JSONResponse(P.completion_response(rid, created, self.model_name, choices,
                                                  P.usage(prompt_tokens, completion_tokens, P.cached_tokens(finals, n))))

    async def _completion_events(self, job: GenerationJob, req: P.CompletionRequest, rid: str, created: int,
                                 prompt_tokens: int, num_choices: int, echo_texts: dict[int, str],
                                 rec: AccessRecord) -> AsyncIterator[dict]:
        with_usage = req.include_usage

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            return P.completion_chunk(rid, created, self.model_name, choices, usage, with_usage)

        emitted = {i: 0 for i in range(num_choices)}  # characters sent per choice (logprob text offsets)
        for i, text in echo_texts.items():
            yield chunk([P.completion_choice(i, text, None, None)])
            emitted[i] = len(text)
        completion_tokens = 0
        finals: dict[int, RequestOutput] = {}
        async for i, out in job.outputs():
            comp = self._checked(out).outputs[0]
            completion_tokens += len(comp.delta_token_ids)
            lp = None
            if req.logprobs is not None and comp.delta_logprobs:
                lp = P.completion_logprobs(comp.delta_logprobs, self.token_text, emitted[i])
            finish = comp.finish_reason if out.finished else None
            if out.finished:
                finals[i] = out
            if not comp.delta_text and lp is None and finish is None:
                continue
            emitted[i] += len(comp.delta_text)
            yield chunk([P.completion_choice(i, comp.delta_text, finish, lp)])
        self._note_finish(rec, finals, completion_tokens)
        if with_usage:
            yield chunk([], P.usage(prompt_tokens, completion_tokens, P.cached_tokens(finals, req.n)))

    # ------------------------------------------------------------ shared steps

    async def _parse(self, request: Request, model: type[BaseModel]):
        body = await request.body()
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            raise from_validation_errors(e.errors(include_url=False)) from None

    def _note(self, rec: AccessRecord, req: P.SamplingFields) -> None:
        rec.model, rec.stream, rec.n, rec.user = req.model, req.stream, req.n, req.user
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model `{req.model}` does not exist; this server serves `{self.model_name}`",
                           type="invalid_request_error", param="model", code="model_not_found")

    @staticmethod
    def _note_finish(rec: AccessRecord, finals: dict[int, RequestOutput], completion_tokens: int) -> None:
        rec.completion_tokens = completion_tokens
        reasons = sorted({out.outputs[0].finish_reason or "" for out in finals.values()})
        rec.finish_reason = ",".join(reasons) or None

    @staticmethod
    def _message_dict(m: P.ChatMessage, i: int) -> dict:
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages.{i}.content: only text content parts are supported "
                                        f"(got type {part.type!r})", param="messages", code="unsupported")
                texts.append(part.text)
            content = "".join(texts)
        # The chat template knows the classic roles; "developer" is OpenAI's new name for "system".
        role = "system" if m.role == "developer" else m.role
        out = {"role": role, "content": content or ""}
        if m.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in m.tool_calls]
        if m.tool_call_id is not None:
            out["tool_call_id"] = m.tool_call_id
        return out

    def _chat_prompt(self, messages: list[dict], tools: T.ToolSet | None = None,
                     template_kwargs: dict | None = None) -> list[int]:
        kwargs = dict(template_kwargs or {})
        for reserved in ("messages", "tools", "add_generation_prompt", "tokenize", "conversation", "chat_template"):
            if reserved in kwargs:
                raise APIError(400, f"chat_template_kwargs may not set {reserved!r}", param="chat_template_kwargs",
                               code="invalid_value")
        has_tool_turns = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if tools is not None or has_tool_turns:
            if T.template_renders_tools(self.tokenizer, self.chat_template):
                if tools is not None:
                    kwargs["tools"] = tools.tools
            else:
                messages = T.render_fallback(messages, tools)
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        try:
            return apply_chat_template(self.tokenizer, messages, **kwargs)
        except Exception as e:  # jinja raises for conversations the template refuses
            # Its text is the template's (and can name files): the log gets it, the client a fixed line.
            log.warning("the chat template refused a conversation: %s: %s", type(e).__name__, e)
            raise APIError(400, "the chat template cannot render these messages (e.g. the roles are not in "
                                "an order it accepts)", param="messages", code="invalid_value") from None

    def _completion_prompts(self, prompt, max_tokens: int | None) -> list[tuple[str | None, list[int]]]:
        """The request's prompt(s) as (text or None, token ids)."""
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]  # one prompt given as token ids
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        if len(items) > P.MAX_PROMPTS:
            raise APIError(400, f"at most {P.MAX_PROMPTS} prompts per request", param="prompt", code="invalid_value")
        out = []
        for item in items:
            if isinstance(item, str):
                # Same tokenization as the engine applies to a text prompt.
                out.append((item, self.tokenizer.encode(item, add_special_tokens=False)))
            else:
                self._check_length(len(item), max_tokens, "prompt")  # before scanning a long list
                if any(t < 0 or t >= self.vocab_size for t in item):
                    raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})",
                                   param="prompt", code="invalid_value")
                out.append((None, list(item)))
        return out

    def _prompt_text(self, prompt: tuple[str | None, list[int]]) -> str:
        text, ids = prompt
        return text if text is not None else self.tokenizer.decode(ids, skip_special_tokens=False)

    def _check_fields(self, req: P.SamplingFields) -> None:
        """The bounds that depend on the model or the settings (the others are the protocol models'), and
        the fields this server does not implement. Before any tokenization: a bad request costs nothing."""
        unsupported = req.unsupported_field()
        if unsupported is not None:
            raise APIError(400, f"`{unsupported}` with this value is not supported by this server (leave it out)",
                           param=unsupported, code="unsupported")
        if req.n > self.settings.max_n:
            raise APIError(400, f"n is {req.n}; this server allows at most {self.settings.max_n} choices per request",
                           param="n", code="invalid_value")
        # The sampler builds per-step tensors from these: a value past the vocabulary would fail the whole
        # step, and with it every request running beside this one.
        if req.top_k is not None and req.top_k > self.vocab_size:
            raise APIError(400, f"top_k must be -1 or 0 (disabled) or at most the vocabulary size {self.vocab_size}",
                           param="top_k", code="invalid_value")
        if any(t >= self.vocab_size for t in req.stop_token_ids or ()):
            raise APIError(400, f"stop_token_ids must be token ids in [0, {self.vocab_size})",
                           param="stop_token_ids", code="invalid_value")
        limit = self.engine.max_model_len
        if req.min_tokens > limit:
            raise APIError(400, f"min_tokens must not exceed this model's context length of {limit} tokens",
                           param="min_tokens", code="invalid_value")

    @staticmethod
    def _grammar_spec(req: P.SamplingFields, tools: T.ToolSet | None) -> GrammarSpec | None:
        """The request's output constraint: response_format, structured_outputs, a guided_* field,
        or a forced tool call (required / named tool_choice); at most one of them."""
        found: list[tuple[str, GrammarSpec]] = []
        try:
            rf = getattr(req, "response_format", None)
            if rf is not None:
                spec = GrammarSpec.from_response_format(rf)
                if spec is not None:
                    found.append(("response_format", spec))
            spec = GrammarSpec.from_structured_outputs(req.structured_outputs)
            if spec is not None:
                found.append(("structured_outputs", spec))
            guided = {name: getattr(req, name) for name in ("guided_json", "guided_regex", "guided_choice",
                                                             "guided_grammar")}
            spec = GrammarSpec.from_guided_fields(**guided)
            if spec is not None:
                found.append((spec.param or "guided_json", spec))
            if tools is not None:
                spec = T.grammar(tools)
                if spec is not None:
                    found.append(("tool_choice", spec))
        except GrammarError as e:
            raise APIError(400, e.message, param=e.param, code="invalid_value") from None
        if len(found) > 1:
            names = ", ".join(n for n, _ in found)
            raise APIError(400, f"only one output constraint per request (got {names})", param=found[1][0],
                           code="invalid_value")
        return found[0][1] if found else None

    async def _constrained(self, params: SamplingParams, spec: GrammarSpec | None) -> SamplingParams:
        """`params` with the grammar, compiled now (off the event loop, cached by the engine) so a
        bad schema is a 400 before anything is queued."""
        if spec is None:
            return params
        try:
            await asyncio.to_thread(self.engine.compile_grammar, spec)
        except Exception as e:
            raise from_engine_error(e) from None
        return replace(params, structured=spec)

    def _check_length(self, num_prompt: int, max_tokens: int | None, param: str) -> None:
        limit = self.engine.max_model_len
        if num_prompt == 0:
            raise APIError(400, "the prompt is empty", param=param, code="invalid_value")
        max_prompt = self.settings.max_prompt_tokens
        if max_prompt is not None and num_prompt > max_prompt:
            raise APIError(400, f"the prompt has {num_prompt} tokens; this server accepts at most {max_prompt}",
                           param=param, code="prompt_too_long")
        max_out = self.settings.max_output_tokens
        if max_tokens is not None and max_out is not None and max_tokens > max_out:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {max_out}",
                           param="max_tokens", code="invalid_value")
        if num_prompt >= limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, "
                                f"but the prompt has {num_prompt} tokens", param=param, code="context_length_exceeded")
        if max_tokens is not None and num_prompt + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but {num_prompt + max_tokens} "
                                f"were requested ({num_prompt} in the prompt, {max_tokens} for the completion)",
                           param="max_tokens", code="context_length_exceeded")

    def _sampling_params(self, req: P.SamplingFields, num_logprobs: int | None) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])  # count and length: the protocol model
        max_tokens = req.output_limit
        if max_tokens is None:  # the server's limit, else up to max_model_len - prompt length (the engine stops there)
            max_tokens = self.settings.max_output_tokens
        if max_tokens is not None and req.min_tokens > max_tokens:
            raise APIError(400, "min_tokens must not exceed max_tokens", param="min_tokens", code="invalid_value")
        d = self.sampling_defaults  # the model's generation_config.json, where the request sets nothing
        try:
            return SamplingParams(
                n=1,
                temperature=d.get("temperature", 1.0) if req.temperature is None else req.temperature,
                top_p=d.get("top_p", 1.0) if req.top_p is None else req.top_p,
                top_k=d.get("top_k", 0) if req.top_k is None else req.top_k,
                min_p=d.get("min_p", 0.0) if req.min_p is None else req.min_p,
                seed=req.seed,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                stop=stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                repetition_penalty=(d.get("repetition_penalty", 1.0) if req.repetition_penalty is None
                                    else req.repetition_penalty),
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                logprobs=num_logprobs,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                max_draft_tokens=req.max_draft_tokens,
                min_tokens_per_s=req.min_tokens_per_s,
                priority=req.priority,
            )
        except Exception as e:  # SamplingParamsError names the parameter
            raise from_engine_error(e) from None

    @staticmethod
    def _seeded(params: SamplingParams, k: int) -> SamplingParams:
        # Choice k of a seeded request samples with seed + k: reproducible, yet not n copies.
        return params if params.seed is None or k == 0 else replace(params, seed=params.seed + k)

    async def _start(self, subs: list[SubRequest], prompt_param: str, req: P.SamplingFields) -> GenerationJob:
        job = GenerationJob(self.engine, subs, self.metrics)
        self.lifecycle.register(job)
        try:
            self._arm_faults(job, req)
            await job.start()
        except Exception as e:
            job.close()  # idempotent; unregisters it
            err = from_engine_error(e, self.queue_retry_after)
            if err.param == "messages":
                err.param = prompt_param
            raise err from None
        timeout = self.settings.request_timeout
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(
                timeout, job.abort, f"the request did not finish within this server's limit of {timeout:g} s",
                504, "request_timeout")
            job.on_close.append(lambda _job: timer.cancel())
        return job

    def _arm_faults(self, job: GenerationJob, req: P.SamplingFields) -> None:
        kind = (req.model_extra or {}).get("dspark_fault") if self.faults is not None else None
        if kind is None:
            return
        rid = job.subs[0].request_id  # its first choice fails
        try:
            self.faults.arm(rid, kind)
        except ValueError as e:
            raise APIError(400, str(e), param="dspark_fault", code="invalid_value") from None
        job.on_close.append(lambda _job: self.faults.disarm(rid))

    async def _wait(self, request: Request, job: GenerationJob) -> dict[int, RequestOutput]:
        """Non-streaming: all final outputs, aborting the job if the client disconnects meanwhile."""
        watcher = asyncio.create_task(self._abort_on_disconnect(request, job))
        try:
            finals = await job.final_outputs()
            for out in finals.values():
                self._checked(out)
            return finals
        except JobAborted as e:
            rec = access_record(request)
            rec.finish_reason, rec.error = "abort", e.reason
            raise APIError(e.status, e.reason, code=e.code) from None
        except APIError:
            raise
        except Exception as e:
            raise from_engine_error(e) from None
        finally:
            watcher.cancel()
            job.close()

    @staticmethod
    async def _abort_on_disconnect(request: Request, job: GenerationJob) -> None:
        # The body is read already, so the next ASGI message can only be the disconnect.
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.abort("the client closed the connection", 499, "client_disconnected")
                return

    @staticmethod
    def _checked(out: RequestOutput) -> RequestOutput:
        """Raise for an output that ended in an engine failure rather than a finish."""
        reason = out.outputs[0].finish_reason
        if out.finished and reason not in ("stop", "length"):
            if reason == "abort":
                raise APIError(503, "the request was aborted by the engine", code="aborted")
            if out.error_code == "grammar_dead_end":  # the request's constraint, not the server
                raise APIError(400, out.error, code="grammar_dead_end")
            raise APIError(500, f"generation failed: {out.error or reason}", code="engine_error")
        return out

    async def _sse_stream(self, events: AsyncIterator[dict], job: GenerationJob,
                          rec: AccessRecord) -> AsyncIterator[str]:
        """Serialize events as SSE; an error after the 200 is sent becomes a final error event."""
        try:
            async for obj in events:
                yield _sse(obj)
            yield _DONE
        except JobAborted as e:
            rec.finish_reason, rec.error, rec.stream_error_status = "abort", e.reason, e.status
            if e.status != 499:  # else nobody is left to tell
                yield _sse(APIError(e.status, e.reason, code=e.code).body())
                yield _DONE
        except asyncio.CancelledError:  # Starlette cancels the body when the client disconnects
            rec.finish_reason, rec.error, rec.stream_error_status = "abort", "client disconnected", 499
            raise
        except Exception as e:
            err = from_engine_error(e)
            rec.error, rec.stream_error_status = err.message, err.status
            yield _sse(err.body())
            yield _DONE
        finally:
            job.close()
