"""Registered servable configs. Import-light: no torch or JAX at import."""
