"""The deploy engine: runs host plans through runners, every host at once.

``host_plans`` (what each host gets, as data) -> ``session``/``host`` (the per-host state
machine: preflight, lock, start what changed, readiness, rollback) -> ``operations`` (deploy,
rollback, releases, lock, unlock, down, status, logs, the dry-run), ``gpu_lease``, ``provision``
and ``setup``; all of them fan out through ``fanout`` and report through ``report``. What a run
takes from its surroundings is read once, at the entry point (``context``).
"""
