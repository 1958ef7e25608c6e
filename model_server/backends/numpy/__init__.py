"""The numpy backend: runs TinyLM, the random-weight test model."""
