"""Fabric tasks (``fab --list``): thin wrappers that load config, build a plan, run it, report.

Run from ``deploy/`` (``cd deploy && fab deploy --env staging``) or anywhere with
``fab -r deploy ...``. Each module below owns one group of tasks.
"""

from invoke import Collection

ns = Collection()

from . import provision as _provision  # noqa: E402

ns.add_task(_provision.provision)

from fabfile import deploy as _deploy  # noqa: E402 (tasks: fab deploy, status, logs, ...)

for _task in _deploy.TASKS:
    ns.add_task(_task)

from . import setup as _setup  # noqa: E402

ns.add_task(_setup.setup)
