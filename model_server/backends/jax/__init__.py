"""The JAX backend: runner, weights, device mesh and multi-host serving."""
