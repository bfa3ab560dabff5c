"""Generation: `POST /v1/chat/completions`, `POST /v1/completions` (OpenAI's) and
`POST /generate` (afina's), each answered whole or, with `stream: true`, as server-sent
events token by token. The inference engine does the work off the event loop."""

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.concurrency import run_in_threadpool

from afina.api.errors import KEYED, APIError, error_body, error_responses
from afina.api.schemas.inference import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    StreamOptions,
    UsageObject,
)
from afina.api.served_models import resolve_job, resolve_model
from afina.serving.engine import InferenceEngine
from afina.serving.protocol import (
    Delta,
    Finished,
    GeneratedText,
    GenerationStream,
    InferenceError,
    ModelSpec,
    Prompt,
    SamplingParams,
)

# Each route answers whole (JSON) or, with `stream: true`, as server-sent events.
router = APIRouter(
    tags=["inference"],
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **error_responses(*KEYED, 400, 403, 404, 409, 413, 429),
    },
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16

Chunk = dict[str, Any]
T = TypeVar("T")


def _api_error(error: InferenceError) -> APIError:
    return APIError(error.status_code, error.message, param=error.param, code=error.code)


async def _resolve(request: Request, *, model: str | None, job_id: str | None) -> ModelSpec:
    state = request.app.state

    def lookup() -> ModelSpec:
        with state.session_factory() as db:
            if job_id is not None:
                return resolve_job(db, state.settings, state.storage, request.state.project, job_id)
            assert model is not None
            return resolve_model(db, state.settings, state.storage, request.state.project, model)

    return await run_in_threadpool(lookup)


def _messages(messages: list[ChatMessage]) -> Prompt:
    turns = tuple(("system" if m.role == "developer" else m.role, m.text()) for m in messages)
    return Prompt(messages=turns, param="messages")


def _params(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest | GenerateRequest,
    max_tokens: int | None,
    max_tokens_param: str,
    default_max_tokens: int | None = None,
) -> SamplingParams:
    ceiling = request.app.state.settings.max_new_tokens
    if max_tokens is not None and max_tokens > ceiling:
        raise APIError(
            400,
            f"{max_tokens_param} is {max_tokens}; this server allows at most {ceiling} "
            "(AFINA_MAX_NEW_TOKENS)",
            param=max_tokens_param,
            code="invalid_value",
        )
    return SamplingParams(
        max_new_tokens=max_tokens,
        default_max_new_tokens=default_max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=tuple(body.stop or ()),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
        max_tokens_param=max_tokens_param,
    )


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the body is read: what comes next is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _while_connected(request: Request, stream: GenerationStream, work: Awaitable[T]) -> T:
    """Await `work` unless the client goes first: then the engine drops the request."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler is being cancelled (the server is stopping)
        task.cancel()
        stream.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():  # the client went first
        task.cancel()
        stream.cancel()
        raise APIError(400, "the client closed the request", code="client_closed")
    try:
        return task.result()
    except InferenceError as error:
        raise _api_error(error) from None


async def _start(
    request: Request, model: ModelSpec, prompt: Prompt, params: SamplingParams
) -> GenerationStream:
    """Queue the request and wait until the engine has accepted its prompt, so that a bad
    prompt is still an HTTP error and not an error inside a started stream."""
    engine: InferenceEngine = request.app.state.inference
    try:
        stream = engine.submit(model, prompt, params)
    except InferenceError as error:
        raise _api_error(error) from None
    await _while_connected(request, stream, stream.next_event())
    return stream


async def _finish(request: Request, stream: GenerationStream) -> GeneratedText:
    return await _while_connected(request, stream, stream.completion())


def _sse(payload: Chunk | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return format_sse_event(data_str=data)


def _event_stream(
    stream: GenerationStream,
    *,
    opening: list[Chunk],
    delta: Callable[[str], Chunk],
    closing: Callable[[Finished], list[Chunk]],
) -> EventSourceResponse:
    async def events() -> AsyncIterator[bytes]:
        try:
            for chunk in opening:
                yield _sse(chunk)
            while True:
                event = await stream.next_event()
                if isinstance(event, Delta):
                    yield _sse(delta(event.text))
                elif isinstance(event, Finished):
                    for chunk in closing(event):
                        yield _sse(chunk)
                    yield _sse("[DONE]")
                    return
        except InferenceError as error:
            yield _sse(error_body(error.status_code, error.message, error.param, error.code))
        finally:
            stream.cancel()  # the client went away: the engine drops the row

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return EventSourceResponse(events(), headers=headers)


def _identity(prefix: str, model: ModelSpec) -> Chunk:
    """What every OpenAI completion object and chunk of one answer shares."""
    return {
        "id": f"{prefix}-{secrets.token_hex(12)}",
        "created": int(time.time()),
        "model": model.name,
    }


def _openai_stream(
    stream: GenerationStream,
    identity: Chunk,
    choice: Callable[[str | None, str | None], Chunk],
    options: StreamOptions | None,
    opening: Chunk | None = None,
) -> EventSourceResponse:
    """OpenAI's chunks: one choice per delta, the finish reason in a last choice, then the
    usage in a chunk with no choice if `stream_options.include_usage` asks for it."""

    def closing(finished: Finished) -> list[Chunk]:
        chunks = [{**identity, "choices": [choice(None, finished.finish_reason)]}]
        if options is not None and options.include_usage:
            chunks.append({**identity, "choices": [], "usage": finished.usage.as_dict()})
        return chunks

    return _event_stream(
        stream,
        opening=[] if opening is None else [{**identity, "choices": [opening]}],
        delta=lambda text: {**identity, "choices": [choice(text, None)]},
        closing=closing,
    )


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    model = await _resolve(request, model=body.model, job_id=None)
    max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.max_tokens, "max_tokens"
    stream = await _start(
        request, model, _messages(body.messages), _params(request, body, max_tokens, param)
    )
    identity = _identity("chatcmpl", model)
    if not body.stream:
        done = await _finish(request, stream)
        return ChatCompletion(
            **identity,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=done.text), finish_reason=done.finish_reason
                )
            ],
            usage=UsageObject.of(done.usage),
        )
    return _openai_stream(
        stream,
        {**identity, "object": "chat.completion.chunk"},
        lambda text, finish_reason: {
            "index": 0,
            "delta": {} if text is None else {"content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        },
        body.stream_options,
        opening={
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        },
    )


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request) -> Any:
    model = await _resolve(request, model=body.model, job_id=None)
    # Without max_tokens: OpenAI's default for completions, not the whole context.
    params = _params(request, body, body.max_tokens, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
    stream = await _start(request, model, Prompt(text=body.prompt[0], param="prompt"), params)
    identity = _identity("cmpl", model)
    if not body.stream:
        done = await _finish(request, stream)
        return Completion(
            **identity,
            choices=[CompletionChoice(text=done.text, finish_reason=done.finish_reason)],
            usage=UsageObject.of(done.usage),
        )
    return _openai_stream(
        stream,
        {**identity, "object": "text_completion"},
        lambda text, finish_reason: {
            "index": 0,
            "text": text or "",
            "logprobs": None,
            "finish_reason": finish_reason,
        },
        body.stream_options,
    )


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request) -> Any:
    if (body.model is None) == (body.job_id is None):
        raise APIError(
            400, "give exactly one of model and job_id", param="model", code="invalid_request"
        )
    if (body.prompt is None) == (body.messages is None):
        raise APIError(
            400, "give exactly one of prompt and messages", param="prompt", code="invalid_request"
        )
    model = await _resolve(request, model=body.model, job_id=body.job_id)
    prompt = (
        _messages(body.messages)
        if body.messages is not None
        else Prompt(text=body.prompt, param="prompt")
    )
    params = _params(request, body, body.max_new_tokens, "max_new_tokens")
    stream = await _start(request, model, prompt, params)
    if not body.stream:
        done = await _finish(request, stream)
        return GenerateResponse(
            model=model.name,
            text=done.text,
            finish_reason=done.finish_reason,
            usage=UsageObject.of(done.usage),
        )
    return _event_stream(
        stream,
        opening=[],
        delta=lambda text: {"model": model.name, "text": text, "finish_reason": None},
        closing=lambda finished: [
            {
                "model": model.name,
                "text": "",
                "finish_reason": finished.finish_reason,
                "usage": finished.usage.as_dict(),
            }
        ],
    )
