"""The one error/exit wrapper of every entry point (``albert`` and the ``fab`` tasks).

A user's mistake (:class:`~pyalbert.errors.AlbertError`) prints one paragraph and gives its exit
code; Ctrl-C gives 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable

from pyalbert.errors import AlbertError


def exit_code(call: Callable[[], object]) -> int:
    """Run ``call``; its int result (or 0), or the exit code of the error it raised."""
    try:
        result = call()
    except AlbertError as exc:
        from pyalbert.ui import console_err  # rich: loaded only to print (~40 ms per call)

        console_err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        from pyalbert.ui import console_err

        console_err.print("[yellow]interrupted[/]")
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
