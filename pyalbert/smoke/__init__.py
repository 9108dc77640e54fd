"""``albert smoke``: the checks of a deployed environment, one per lane of the pipeline.

``albert smoke api`` (or ``albert smoke``; the ``test:api`` job) goes through the api gateway.
Checks, each a JUnit test case:

* ``api ready``: ``GET /v1/models`` answers (waits, up to a deadline, while the api refuses
  connections, answers 503 or does not list every routed model yet);
* ``models listed``: every model of the routing table is in ``GET /v1/models``;
* ``chat <model>`` and ``stream <model>``: a small completion, plain and streamed (SSE), returns
  non-empty text within the per-request timeout;
* ``bad key refused``: a wrong API key gets 401;
* ``whitelist header``: answers carry ``X-Albert-Whitelist: <mode>; entries=<n>`` with the
  environment's mode (skipped, and said so, when the mode is ``off``).

``albert smoke vllm`` (the ``test:vllm`` job) asks every vLLM server of the plan, no gateway in
between, *on its host*: servers listen on the host's loopback or private address only and require
the servers' key (issue 14), so each call is a ``curl`` run over SSH (:class:`HostTransport`,
:func:`pyalbert.commands.health.http_call`) with the key's header file the deploy left on the host.
Per server, each check a JUnit test case named ``<model> on <host>:<port> …``:

* ``/health``: answers 200 (waits, up to a deadline shared by all servers, while the server refuses
  connections or answers 503);
* ``/v1/models``: lists the served model id (the routing-table key, vLLM's ``--served-model-name``);
* ``completion``: one short chat completion of that model returns non-empty text.

When ``/health`` fails, the server's other two checks are skipped (the one failure says why).
"""

from pyalbert.smoke.api_checks import BAD_KEY, WHITELIST_HEADER, SmokeRun, SmokeTarget, run_smoke
from pyalbert.smoke.checks import PROMPT, CheckResult
from pyalbert.smoke.report import junit_xml, summary_table, write_junit
from pyalbert.smoke.vllm_checks import (
    HostTransport,
    VllmServer,
    VllmSmokeRun,
    VllmSmokeTarget,
    run_vllm_smoke,
    vllm_servers,
)

__all__ = ["BAD_KEY", "PROMPT", "WHITELIST_HEADER", "CheckResult", "HostTransport", "SmokeRun",
           "SmokeTarget", "VllmServer", "VllmSmokeRun", "VllmSmokeTarget", "junit_xml", "run_smoke",
           "run_vllm_smoke", "summary_table", "vllm_servers", "write_junit"]
