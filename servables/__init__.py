"""Servable configs and their registry, model architectures, the checkpoint layout and reader.

Read by every server and tool; imports neither torch nor JAX.
"""
