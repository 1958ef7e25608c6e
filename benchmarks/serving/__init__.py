"""Pieces of the serving benchmark (`benchmarks/serve.py`): workloads, load generators, the
systems compared, the memory-bandwidth roofline and the report."""
