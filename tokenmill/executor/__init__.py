"""Executors: how the engine core reaches its model worker(s). See ``executor.py``."""
