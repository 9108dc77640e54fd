"""The api gateway on a host: ``albert api`` behind the front door (HAProxy, the *edge*).

Zero-loss redeploy: HAProxy listens on the public ``api.port`` with both colours as servers. A new
api starts on the spare port of the other colour (``blue``/``green``, bound to 127.0.0.1 only) and
on its unix socket (:func:`socket_path`, HAProxy's way in: no loopback TCP), is checked ready, then HAProxy's runtime API makes it the live server and the old one ``maint``
(:func:`pyalbert.commands.edge.switch`, which also records the live port in the upstream file):
the old api finishes its in-flight requests while new ones already reach the new one, then stops.
"""

from __future__ import annotations

from typing import Literal

from pyalbert.commands.base import Cmd

Colour = Literal["blue", "green"]
COLOURS: tuple[Colour, Colour] = ("blue", "green")
#: where files are seen inside the api container
IN_CONTAINER = "/etc/albert"


def spare_port(public_port: int, colour: Colour) -> int:
    """A port for one colour, derived from the public one, bound to 127.0.0.1 only.

    In 20000-31999: below Linux's ephemeral range (32768-60999), so that no outgoing connection
    on the host (the api's own, to its backends) can be holding it when a colour starts.
    """
    return 20000 + (public_port % 6000) * 2 + COLOURS.index(colour)


def sockets_dir(edge_dir: str) -> str:
    """The colours' unix sockets: a folder of the front door's (the same path in every container)."""
    return f"{edge_dir}/sockets"


def socket_path(edge_dir: str, colour: Colour) -> str:
    """Where one colour's gateway listens for HAProxy (``albert api --uds``)."""
    return f"{sockets_dir(edge_dir)}/{colour}.sock"


def other(colour: Colour) -> Colour:
    return "green" if colour == "blue" else "blue"


def serve_args(env: str, port: int, *, keys: bool, whitelist: bool, workers: int = 1,
               upstream_key: bool = False, host: str = "0.0.0.0",
               routes: str | None = None, uds: str | None = None) -> list[str]:
    """``albert api ...`` inside the container (config and files under ``/etc/albert``)."""
    return [
        "albert", "api", "--env", env, "--config-dir", f"{IN_CONTAINER}/config",
        "--backends", f"{IN_CONTAINER}/backends.json",
        *(["--keys", f"{IN_CONTAINER}/keys.json"] if keys else ["--no-auth"]),
        *(["--upstream-key", f"{IN_CONTAINER}/upstream.key"] if upstream_key else []),
        *(["--whitelist", f"{IN_CONTAINER}/whitelist.json"] if whitelist else []),
        *(["--routes", routes] if routes else []),
        "--host", host, "--port", str(port), *(["--uds", uds] if uds else []),
        "--workers", str(workers),
    ]


def read_upstream(path: str) -> Cmd:
    return Cmd.of("cat", path)
