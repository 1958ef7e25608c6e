"""The batching engine: scheduler, paged KV cache, sampling, the engine core and its servable."""
