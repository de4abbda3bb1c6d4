"""Serving: a request's state (``sequence``), the scheduler that decides each step
(``scheduler``), the runner that executes it (``runner``) on the engine's memory (``memory``), the
engine loop that joins them (``engine``), generation with retrieval modes (``generate``),
OpenAI's schemas and errors (``openai_api``) and the Ray Serve deployments (``deployments``).
Imports training (for its prompt templates) and below; only ``deployments`` imports Ray."""
