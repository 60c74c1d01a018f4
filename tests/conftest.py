"""Suite-wide fixtures. Torch threads are kept low so a server and its client can share 2 cores;
expensive things (the built-in model, the transformers reference) load once per session."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

torch.set_num_threads(int(os.environ.get("TOKENMILL_NUM_THREADS", "2")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub
warnings.filterwarnings("ignore", message=".*not writable.*")


@pytest.fixture(scope="session", autouse=True)
def native_kernels():
    """Build the native kernels once, before any test: a cold build (~1 min on 2 cores) must not
    land inside a test's server start-up deadline. None when they cannot be built here."""
    from tokenmill.layers.kernels.extension import native_module

    return native_module()


@pytest.fixture(scope="session")
def builtin_source():
    from tokenmill.loader.model_source import open_model_source

    return open_model_source(None)


@pytest.fixture(scope="session")
def builtin_model(builtin_source):
    from tokenmill.models.registry import build_model

    # dequantized, as transformers loads the file: the logits must agree to 1e-3
    return build_model(builtin_source, torch.float32, "cpu", quantization="none")


@pytest.fixture(scope="session")
def hf_builtin_tokenizer(builtin_source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_source.path.parent,
                                         gguf_file=builtin_source.path.name)


@pytest.fixture(scope="session")
def hf_builtin_model(builtin_source):
    """The reference: transformers' own GGUF loading and Llama implementation, in float32."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        builtin_source.path.parent, gguf_file=builtin_source.path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def llm(builtin_source):
    """The built-in model behind the whole engine, with a modest KV pool (256 MiB).

    It runs on the file's GGUF blocks (the default ``quantization="auto"``) with float32
    activations, pinned so that every machine computes the same thing whatever its bf16 support
    (``dtype="auto"`` picks bfloat16 on CPUs that have it; tests of that default name it)."""
    from tokenmill.config import CacheConfig, EngineConfig, ModelConfig
    from tokenmill.engine.llm import LLM

    return LLM(config=EngineConfig(model=ModelConfig(dtype="float32"),
                                   cache=CacheConfig(kv_cache_memory=2**28)))


@pytest.fixture
def assert_no_leaked_blocks(llm):
    """Use in any test that runs the shared engine: afterwards every KV block must be free."""
    yield llm
    llm.engine.scheduler.check_no_leaks()


@pytest.fixture(scope="session")
def tokenmill_server():
    """One real `tokenmill serve` process for the whole session (server and gateway tests)."""
    from tests.server_fixture import ServerProcess

    # float32 activations, like the `llm` fixture, so served text can be compared with it
    server = ServerProcess("--price-per-hour", "3.6", "--cost-window-seconds", "600",
                           "--dtype", "float32")
    server.wait_ready()
    yield server
    server.stop()
