"""Provisioning: ``utils/init_vm.sh`` as root on every host of an environment, in parallel.

The deploy user's password and public key (``GITLAB_PASSWORD``, ``GITLAB_SSH_PUBLIC_KEY``) travel
on stdin; missing ones stop everything before the first connection.
"""

from __future__ import annotations

from rich.markup import escape

from pyalbert.commands import firewall
from pyalbert.commands.base import Cmd, sudo
from pyalbert.commands.provision import (
    InitVmReport,
    edge_low_port,
    init_vm,
    parse_init_vm,
    provision_secrets,
    read_script,
)
from pyalbert.config.deployment import resolved
from pyalbert.config.environment import HostSpec
from pyalbert.config.placement import Placement
from pyalbert.engine.fanout import HostOutcome, RunnerFactory, fan_out, ssh_runners
from pyalbert.errors import AlbertError
from pyalbert.remote import Runner
from pyalbert.ui import console


def provision_hosts(spec, *, admin_user: str = "root", dry_run: bool = False, gpu: str = "auto",
                    user: str = "gitlab", environ=None,
                    runners: RunnerFactory | None = None) -> list[HostOutcome]:
    """Provision every host of ``spec``; each outcome's value is an :class:`InitVmReport`."""
    if gpu not in ("auto", "yes", "no"):
        raise AlbertError(f"--gpu must be auto, yes or no, not {gpu!r}")
    secrets = provision_secrets(environ)  # missing variables: fail before any connection
    script = read_script()
    env = spec.env
    edge_port = edge_low_port(env.api.port, env.edge.redirect_port)

    def init_cmd(host: HostSpec) -> Cmd:
        """The same on every host, plus the front door's low port on the api's hosts."""
        return init_vm(script, secrets, user=user, storage_dir=env.storage_dir, gpu=gpu,  # type: ignore[arg-type]
                       dry_run=dry_run, as_root=admin_user == "root",
                       edge_port=edge_port if placement.api_on(host.name) else None)

    factory = runners or ssh_runners(spec)

    def as_admin(host: HostSpec) -> Runner:
        return factory(host.model_copy(update={"user": admin_user}))

    placement = resolved(spec).placement

    def admin(c: Cmd) -> Cmd:
        return c if admin_user == "root" else sudo(c)

    def work(runner: Runner, host: HostSpec, cancel) -> InitVmReport:
        result = runner.run(init_cmd(host), timeout=1800)
        report = parse_init_vm(result.stdout)
        for name, wanted in ray_firewall(placement, host):  # check, then act
            if firewall.is_current(runner.run(admin(firewall.show(name)), check=False).stdout, wanted):
                report.notes.append(f"firewall {name}: already {len(wanted)} rules, unchanged")
            elif dry_run:
                report.would_change.append(f"firewall {name}: {len(wanted)} rules")
            else:
                runner.run(admin(firewall.ensure(name, wanted)))
                report.changed.append(f"firewall {name}: {len(wanted)} rules")
        for line in report.changed:
            console.print(f"[bold]\\[{host.name}][/] changed: {escape(line)}", soft_wrap=True)
        for line in report.would_change:
            console.print(f"[bold]\\[{host.name}][/] would change: {escape(line)}", soft_wrap=True)
        return report

    return fan_out(env.hosts, work, as_admin)


def ray_firewall(placement: Placement, host: HostSpec) -> list[tuple[str, list[str]]]:
    """(chain, rules) for each host group ``host`` is in: the other hosts of the group reach the
    node's Ray ports (:meth:`~pyalbert.config.ray_ports.RayPortsSpec.between_nodes`), nobody else does;
    the head's client server and dashboard are closed to all. Pure."""
    out = []
    for group in placement.groups_on(host.name):
        head = group.is_head(host)
        peers = [h.internal_address for h in group.hosts if h.name != host.name]
        closed = [group.ports.client_server, group.ports.dashboard] if head else []
        name = firewall.chain(group.name)
        out.append((name, firewall.rules(name, peers, group.ports.between_nodes(head=head), closed)))
    return out
