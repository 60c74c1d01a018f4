"""Tensor parallelism: process groups, the all-reduce, and how each layer is cut into shards."""
