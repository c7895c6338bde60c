"""HTTP server: OpenAI-compatible API, SGLang-style /generate, /health, /metrics (see docs/api.md)."""
