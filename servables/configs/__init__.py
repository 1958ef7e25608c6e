"""Registered servable configs, one module per family; found by `servables.registry`."""
