"""Model side of the engine: config, weight loading, the native Llama-family forward,
the paged KV cache and the attention backends."""
