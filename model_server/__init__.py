"""The model server: joins a cell's admin, loads what it is told and serves the LM methods.

Run it with `python -m model_server`; see `model_server.server.ModelServer` to embed it.
"""
