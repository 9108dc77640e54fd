"""The api service: an OpenAI-compatible gateway in front of the vLLM replicas.

``albert api --env ENV`` serves, per gateway process:

- ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``: routed by ``model`` to
  the replicas of the routing table (``load_spec(env).placement.backends`` or ``--backends``) with
  least-outstanding-requests balancing, passive health (:mod:`pyalbert.api.routing`) and one
  retry on another replica for a connect failure or a 503 while nothing was sent to the client.
  Streams (SSE) are relayed as they arrive; an upstream failure mid-stream ends the stream with
  an ``{"error": ...}`` event (the openai client raises ``APIError``).
- ``GET /v1/models``: the models with at least one healthy replica that the key may use.
- ``GET /health`` (liveness), ``GET /ready`` (200 when every model has a healthy replica, else
  503), ``GET /metrics`` (Prometheus text; with ``api.metrics_auth``, on by default, it needs a
  scrape key: a key with ``scrape: true`` in the keys file; unknown routes count as ``other``).

Errors are OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 malformed
JSON, no model, or a count (``max_tokens``, ``max_completion_tokens``, ``n``, ``best_of``) that is
not an integer >= 1, 401 missing/invalid key, 403 model not allowed for the key, 404 unknown
model (the message lists the models) or route, 413 body over ``api.max_body_bytes``, 429 rate
limit (``Retry-After``), 502 replica failed, 503 no replica reachable (``Retry-After``), 504 no
response head within ``first_byte_timeout_s`` / no complete answer within ``total_timeout_s``.
Before the app: 431 request line + headers over ``max_header_bytes``, 408 a request not received
within ``read_timeout_s`` (:mod:`pyalbert.api.http_guard`).

Keys: Bearer keys, stored hashed in the keys file named by ``$ALBERT_API_KEYS`` (format in
:mod:`pyalbert.api.keys`), each with allowed models, requests/min, tokens/min and a max_tokens
cap; ``max_tokens``/``max_completion_tokens`` above the cap (key's or ``api.max_tokens_cap``)
are lowered to it (``max_tokens`` is set to it when both are absent), ``n``/``best_of`` likewise
(key's ``max_n`` or ``max_n_cap``); tokens per minute are reserved at admission and settled when
the request ends, however it ends (:mod:`pyalbert.api.admission`). Answers are post-processed with the whitelist (:mod:`pyalbert.api.answers`);
every response has the header ``X-Albert-Whitelist: <mode>; entries=<n>``. SIGHUP re-reads keys
and whitelist (a broken file keeps the previous one and logs ``reload_failed``). Access logs are
JSON lines on stdout (time, route, status, model, key *name*, replica, retries, tokens, ms):
never a prompt, an answer or a key.
"""

from pyalbert.api.settings import GatewaySettings, parse_backends, settings_from_spec


def create_app(settings: GatewaySettings, **kwargs):
    """The ASGI application (imports the server dependencies only when called)."""
    from pyalbert.api.app import create_app as _create

    return _create(settings, **kwargs)


__all__ = ["GatewaySettings", "create_app", "parse_backends", "settings_from_spec"]
