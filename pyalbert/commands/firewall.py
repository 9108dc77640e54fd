"""The firewall of a host group's Ray nodes (issue 17): pure builders and the fact that says
whether a host already has the rules.

Ray's raylet listens on every interface whatever ``--node-ip-address`` says, and Ray has no token
auth by default: the rules are what keeps a cluster private. One iptables chain per group,
jumped to from INPUT: loopback passes, the group's other hosts reach the node's Ray ports, everyone
else is dropped on those ports (the client server and the dashboard, closed to all). The chain is
written whole and atomically (``iptables-restore --noflush`` flushes only the chains it declares),
so a re-run converges: when ``iptables -S CHAIN`` already prints :func:`rules`, nothing runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyalbert.commands.base import Cmd, any_of

#: iptables allows 15 ports (a range counts two) in one multiport match
MULTIPORT_MAX = 15
Port = int | tuple[int, int]


def chain(group: str) -> str:
    """``ALBERT-RAY-<group>`` (iptables chain names have at most 28 characters)."""
    return f"ALBERT-RAY-{group}"[:28]


def _dports(ports: Sequence[Port]) -> str:
    parts = [f"{p[0]}:{p[1]}" if isinstance(p, tuple) else str(p) for p in ports]
    if sum(2 if isinstance(p, tuple) else 1 for p in ports) > MULTIPORT_MAX:
        raise ValueError(f"more than {MULTIPORT_MAX} ports in one rule: {','.join(parts)}")
    return ",".join(parts)


def rules(name: str, peers: Sequence[str], open_ports: Sequence[Port],
          closed_ports: Sequence[Port] = ()) -> list[str]:
    """The chain's rules exactly as ``iptables -S CHAIN`` prints them (peers: addresses)."""
    opened = _dports(open_ports)
    out = [f"-A {name} -i lo -j RETURN"]
    out += [f"-A {name} -s {peer}/32 -p tcp -m multiport --dports {opened} -j ACCEPT"
            for peer in peers]
    out.append(f"-A {name} -p tcp -m multiport --dports {_dports([*open_ports, *closed_ports])} "
               "-j DROP")
    return out


def show(name: str) -> Cmd:
    """Probe: the chain's rules (fails, prints nothing, when the chain does not exist)."""
    return any_of(Cmd.of("iptables", "-S", name), Cmd.of("true"))


def is_current(stdout: str, wanted: Sequence[str]) -> bool:
    """The chain already holds exactly ``wanted`` (and INPUT is not asked here: see ensure)."""
    return [ln for ln in stdout.splitlines() if ln.startswith("-A ")] == list(wanted)


def ensure(name: str, wanted: Sequence[str]) -> Cmd:
    """Write the chain whole, atomically, then jump to it from INPUT unless it already does."""
    text = "\n".join(["*filter", f":{name} - [0:0]", *wanted, "COMMIT"]) + "\n"
    script = ('printf %s "$1" | iptables-restore --noflush && '
              '{ iptables -C INPUT -j "$2" 2>/dev/null || iptables -I INPUT 1 -j "$2"; }')
    return Cmd.of("sh", "-c", script, "ensure_firewall", text, name)
