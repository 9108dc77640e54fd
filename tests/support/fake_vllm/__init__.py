"""A fake vLLM OpenAI server (and a fake ``albert api``) in a small image, for fast deploy tests.

``vllm.entrypoints.openai.api_server`` takes vLLM's arguments and serves ``/health``,
``/v1/models`` and ``/v1/chat/completions``. Its behaviour comes from the environment (the
container's ``--env-file``, so a routing-table ``env`` entry drives it):

- ``FAKE_VLLM_START_DELAY``: seconds of 503 on ``/health`` before ready (weights "loading").
- ``FAKE_VLLM_FAIL``: ``exit`` (dies at start, like a bad model), ``never-ready`` (503 forever).
- ``FAKE_VLLM_RAY=1``: like vLLM's Ray executor on the real Ray cluster at ``$RAY_ADDRESS``: a
  placement group and an actor per worker, listening only once they are placed (after
  ``FAKE_VLLM_START_DELAY``), exit when one dies (:mod:`fake_ray`).
- ``FAKE_VLLM_REQUIRE_MODEL_DIR=1``: exit when ``--model`` is not a directory (a missing mount).
- ``VLLM_API_KEY`` / ``--api-key``: as vLLM, ``/v1/*`` then needs that Bearer token (401
  ``{"error": "Unauthorized"}``); ``/health`` and ``/metrics`` stay open.

``albert`` (``albert api ...``) serves ``/health``, lists the backends file's models and relays
chat to the model's replica with ``--upstream-key``.
"""
