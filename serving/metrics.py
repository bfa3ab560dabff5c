"""The inference engine's Prometheus metrics, kept in this process (prometheus_client's
default registry) and exposed by the API's `GET /metrics`:

- `afina_generation_requests_total{outcome}`: generation requests by how they ended: `stop`
  (a stop token or string), `length` (their token limit), `error` (answered with an error:
  a bad prompt, a model that cannot load, out of memory), `cancelled` (the client went away
  first), `rejected` (refused before queueing: the queue is full, the engine unavailable
  or shutting down);
- `afina_generation_tokens_total`: tokens generated, all requests together;
- `afina_generation_time_to_first_token_seconds`: from a request's submission to its first
  generated token: its wait in the queue, the batch window, model and adapter loading, and
  the batch's prefill;
- `afina_generation_time_per_output_token_seconds`: the time between one token of a request
  and its next, once per token after the first: a decoding step of its batch;
- `afina_generation_batch_size`: the requests decoded together, once per batch;
- `afina_adapter_cache_hits_total`, `..._misses_total`, `..._evictions_total`: a batch row's
  adapter was loaded already, or had to be loaded; an adapter was unloaded to make room
  (AFINA_MAX_LOADED_ADAPTERS, or its base model made room for another).

Everything but a refusal is counted on the engine's thread, which owns the streams' outcome
marks; nothing here imports torch.
"""

from collections.abc import Iterable

from prometheus_client import Counter, Histogram

# How a request ended; each request is counted once, at its first ending.
OUTCOMES = ("stop", "length", "error", "cancelled", "rejected")

REQUESTS = Counter(
    "afina_generation_requests",
    "Generation requests by outcome: stop, length, error, cancelled (the client went away), "
    "rejected (refused before queueing)",
    ["outcome"],
)
TOKENS = Counter("afina_generation_tokens", "Tokens generated")
TIME_TO_FIRST_TOKEN = Histogram(
    "afina_generation_time_to_first_token_seconds",
    "From a generation request's submission to its first token (queue, loading, prefill)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "afina_generation_time_per_output_token_seconds",
    "Time between a request's consecutive generated tokens (its batch's decoding step)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5),
)
BATCH_SIZE = Histogram(
    "afina_generation_batch_size",
    "Generation requests decoded together in one batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
ADAPTER_CACHE_HITS = Counter(
    "afina_adapter_cache_hits", "Batch rows whose adapter was loaded already"
)
ADAPTER_CACHE_MISSES = Counter(
    "afina_adapter_cache_misses", "Batch rows whose adapter had to be loaded"
)
ADAPTER_CACHE_EVICTIONS = Counter(
    "afina_adapter_cache_evictions",
    "Adapters unloaded to make room for another adapter or base model",
)

_ENDED = {outcome: REQUESTS.labels(outcome) for outcome in OUTCOMES}  # every series from 0


def ended(outcome: str) -> None:
    """A request ended so (one of OUTCOMES)."""
    _ENDED[outcome].inc()


def first_tokens(submitted: Iterable[float], now: float) -> None:
    """Requests submitted at these times (`time.perf_counter()`) got their first token now."""
    for at in submitted:
        TIME_TO_FIRST_TOKEN.observe(now - at)


def next_tokens(rows: int, seconds: float) -> None:
    """`rows` requests each got their next token, `seconds` after their last one."""
    for _ in range(rows):
        TIME_PER_OUTPUT_TOKEN.observe(seconds)
