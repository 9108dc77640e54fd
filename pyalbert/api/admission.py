"""What one request may ask for, and what it reserves of its key's tokens per minute.

Counts: ``max_tokens``, ``max_completion_tokens``, ``n`` and ``best_of`` must be an integer >= 1,
or a JSON number equal to one (``1e5``, ``100000.0``: forwarded as the integer). Anything else
(a string, a boolean, a fraction, 0, a negative) is a 400 naming the field, as OpenAI answers.
vLLM coerces ``"100000"`` and ``100000.0`` itself, so a cap that looked at Python ints only was
bypassed (issue 14).

Caps: the token fields are lowered to the smaller of the key's ``max_tokens`` and
``api.max_tokens_cap`` (``max_tokens`` is set to it when neither field is sent); ``n`` and
``best_of`` to the smaller of the key's ``max_n`` and ``api.max_n_cap``.

Reservation: a key with ``tokens_per_minute`` is charged at admission what the request may use at
most (a prompt estimate of body bytes / 4, plus the completion budget times the choices), and
settled when the request ends, however it ends (:meth:`pyalbert.api.keys.Key.settle`): with the
usage the replica reported, or for a stream cut short what was relayed, or, when nothing is known
(a client gone before a plain answer), the reservation stays charged.
"""

from __future__ import annotations

from typing import Any

import orjson

from pyalbert.api import errors as E

TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
CHOICE_FIELDS = ("n", "best_of")
COUNT_FIELDS = frozenset(TOKEN_FIELDS + CHOICE_FIELDS)
#: completion budget when the request sets none and the replica's max_model_len is unknown
DEFAULT_MODEL_LEN = 4096
#: vLLM's default max_tokens for /v1/completions
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
PROMPT_BYTES_PER_TOKEN = 4


def smaller(a: int | None, b: int | None) -> int | None:
    """The tighter of two optional caps."""
    if a is None:
        return b
    return a if b is None or a < b else b


def prompt_estimate(body_size: int) -> int:
    return body_size // PROMPT_BYTES_PER_TOKEN + 1


def count(req: dict, field: str) -> int | None:
    """``req[field]`` as an int >= 1, None when absent or null; a 400 for anything else."""
    value = req.get(field)
    if value is None:
        return None
    if type(value) is int:
        number = value
    elif type(value) is float and value.is_integer():
        number = int(value)
    else:
        shown = orjson.dumps(value)[:40].decode(errors="replace")
        raise E.ApiError(400, f"invalid type for '{field}': expected an integer, got {shown}",
                         "invalid_request_error", "invalid_type", field)
    if number < 1:
        raise E.ApiError(400, f"invalid '{field}': expected an integer >= 1, got {number}",
                         "invalid_request_error", "integer_below_min_value", field)
    return number


def _set(req: dict, field: str, number: int | None, cap: int | None) -> bool:
    """Store ``number`` (lowered to ``cap``) as a canonical int; True if ``req`` changed."""
    if number is None:
        return False
    if cap is not None and number > cap:
        number = cap
    if type(req[field]) is int and req[field] == number:
        return False
    req[field] = number
    return True


def apply_caps(req: dict, token_cap: int | None, n_cap: int | None) -> bool:
    """Validate the counts of a chat/completions request and cap them; True if ``req`` changed."""
    if token_cap is None and not req.keys() & COUNT_FIELDS:
        return False  # the common case, on every request: nothing to check
    changed = False
    absent = True
    for field in TOKEN_FIELDS:
        number = count(req, field)
        if number is not None:
            absent = False
            changed |= _set(req, field, number, token_cap)
    if absent and token_cap is not None:
        req["max_tokens"] = token_cap
        changed = True
    for field in CHOICE_FIELDS:
        changed |= _set(req, field, count(req, field), n_cap)
    return changed


def reservation(req: dict, body_size: int, route: str, model_len: Any = None) -> int:
    """Tokens a request may use at most: prompt estimate + completion budget x choices."""
    prompt = prompt_estimate(body_size)
    if route == "embeddings":
        return prompt
    budget = req.get("max_tokens") or req.get("max_completion_tokens")
    if not isinstance(budget, int):
        if route == "completions":
            budget = COMPLETIONS_DEFAULT_MAX_TOKENS
        else:
            budget = model_len if isinstance(model_len, int) and model_len > 0 else DEFAULT_MODEL_LEN
    n, best_of = req.get("n"), req.get("best_of")
    choices = max(n if type(n) is int else 1, best_of if type(best_of) is int else 1)
    return prompt + budget * choices
