"""The gateway: an OpenAI-compatible reverse proxy composed of one-file stages (see app.py)."""
