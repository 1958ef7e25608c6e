"""Runners: the code that runs a model on a device (torch, JAX, numpy), behind one protocol."""
