"""Model loaders: files in, ``(name, tensor)`` pairs, architecture numbers and a tokenizer out."""
