"""Suite-wide settings: torch threads are kept low so a server and its client can share 2 cores."""

from __future__ import annotations

import os

import torch

torch.set_num_threads(int(os.environ.get("TOKENMILL_NUM_THREADS", "2")))
