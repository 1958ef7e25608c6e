"""The batching engine: scheduler, KV cache slots, sampling, the engine core and its servable."""
