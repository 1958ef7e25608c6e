"""Offline tools: checkpoint conversion (GGUF, Hugging Face, Meta) and memory estimation."""
