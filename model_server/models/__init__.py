"""Model implementations: pure modules, one per architecture and backend."""
