"""Text the builders put on hosts, rendered from ``pyalbert/templates`` (Jinja, strict)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


@lru_cache(maxsize=1)
def _jinja() -> Environment:
    return Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined,
                       keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                       autoescape=False)


def render(template: str, **values: object) -> str:
    return _jinja().get_template(template).render(**values)


def template_text(name: str) -> str:
    """A template's text, not rendered (for a file shipped to hosts unchanged)."""
    return (TEMPLATES / name).read_text()
