"""Albert Deploy: open-weight LLMs from a model hub to a tested OpenAI-compatible service."""

__version__ = "0.1.0"
