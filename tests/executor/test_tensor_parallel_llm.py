"""Tensor parallelism through ``LLM``: N worker processes, each holding its shard of every layer
and of the KV heads, give the greedy tokens of one rank and log probabilities within
``LOGPROB_TOLERANCE``, in a batch as alone, with preemption and prefix-cache hits, and leak no KV
block. A tiny random Llama at TP=2, the built-in model at TP=3 (9 heads, 3 KV heads), tiny random
MoE models at TP=2 against transformers; a rank killed mid-generation fails the engine; a TP
degree the model or the machine cannot take is refused before any worker starts."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.executor.test_multi_process_executor import (
    FAILURE_DEADLINE_S,
    PROMPTS,
    assert_gone,
    worker_processes,
)
from tests.models.moe_support import hf_greedy, make_hf_moe, save_folder
from tokenmill import SamplingParams
from tokenmill.config import EngineConfig, ParallelConfig
from tokenmill.engine.llm import LLM
from tokenmill.errors import ConfigError, WorkerFailedError
from tokenmill.executor.factory import check_parallel_placement, usable_cores
from tokenmill.models.arch_config import ArchConfig

# float32 through other summation orders (row-parallel partial sums, then the all-reduce):
# measured ~4e-6 on the built-in model's log probabilities; the greedy tokens must be equal.
LOGPROB_TOLERANCE = 1e-3
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3)
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 1,  # 1 KV head < 2 ranks
              "max_position_embeddings": 256, "vocab_size": 49152, "tie_word_embeddings": False}
# 2 ranks on 2 cores is allowed anyway; this keeps the tests running under a 1-core taskset
SHARE_CORES = {"allow_more_ranks_than_cores": True}


def make_llm(model: str | None = None, **kwargs: Any) -> LLM:
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("kv_cache_memory", 2**25)
    return LLM(model, **kwargs)


def run(llm: LLM, prompts: list[Any], params: SamplingParams = GREEDY) -> list[Any]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.scheduler.check_no_leaks()
    return [o.outputs[0] for o in outputs]


def assert_same_generation(ours: list[Any], theirs: list[Any]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.token_id == y.token_id
            assert x.logprob == pytest.approx(y.logprob, abs=LOGPROB_TOLERANCE)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, hf_builtin_tokenizer) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
    with torch.no_grad():  # logits of a few units: greedy choices with clear gaps
        model.lm_head.weight.normal_(0, 0.3)
    return str(save_folder(model, tmp_path_factory.mktemp("tiny-llama"), hf_builtin_tokenizer,
                           False))


@pytest.fixture(scope="module")
def tiny_prompts(hf_builtin_tokenizer) -> list[list[int]]:
    return [hf_builtin_tokenizer.encode(p) for p in PROMPTS]


def test_tp2_tiny_llama_matches_one_rank_alone_batched_and_preempted(tiny_llama, tiny_prompts):
    with make_llm(tiny_llama) as llm:
        expected = run(llm, tiny_prompts)
        one_rank_block_bytes = llm.engine.kv_spec.bytes_per_block
        one_rank_weights = llm.engine.executor.weight_bytes[0]
    # a pool of 10 blocks: the 5-prompt batch is preempted, and the two shared prefixes hit
    pool = 10 * one_rank_block_bytes
    with make_llm(tiny_llama, tensor_parallel_size=2, kv_cache_memory=pool,
                  max_num_batched_tokens=64, **SHARE_CORES) as llm:
        executor = llm.engine.executor
        assert [(i.rank, i.world_size, i.distributed_backend) for i in executor.worker_infos] == [
            (0, 2, "gloo"), (1, 2, "gloo")]
        assert sorted(p.pid for p in worker_processes()) == sorted(executor.worker_pids)
        assert_same_generation(run(llm, tiny_prompts), expected)
        stats = llm.engine.get_stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0, stats
        # batch invariance: each prompt alone gives what it gave in the batch
        for prompt, reference in zip(tiny_prompts[:2], expected):
            assert_same_generation(run(llm, [prompt]), [reference])
        # each rank caches its half of the KV heads: the one KV head is replicated, so a
        # block holds as much as on one rank; the pool was given per rank
        assert llm.engine.kv_spec.bytes_per_block == one_rank_block_bytes
        # every matrix is halved but the replicated KV head's and the norms
        for size in executor.weight_bytes:
            assert size < 0.56 * one_rank_weights
        pids = list(executor.worker_pids)
    assert_gone(pids)


def test_tp3_builtin_model_keeps_its_gguf_blocks_and_a_third_of_everything(
        builtin_source) -> None:
    prompts = PROMPTS[:3]
    with make_llm() as llm:
        expected = run(llm, prompts)
        one_rank = (llm.engine.executor.weight_bytes[0], llm.engine.kv_spec.bytes_per_block)
    with make_llm(tensor_parallel_size=3, **SHARE_CORES) as llm:
        executor = llm.engine.executor
        assert_same_generation(run(llm, prompts), expected)
        # 3 query heads and 1 of the 3 KV heads each; GGUF blocks cut along whole blocks,
        # never dequantized; norms are the only replicated weights
        arch = builtin_source.arch
        replicated = 4 * (2 * arch.num_hidden_layers + 1) * arch.hidden_size
        assert llm.engine.kv_spec.bytes_per_block * 3 == one_rank[1]
        for info in executor.worker_infos:
            assert info.weight_bytes <= one_rank[0] / 3 + replicated
            assert info.weights.startswith("gguf:") and "float32" not in info.weights
        assert executor.allreduce == "shm"
        pids = list(executor.worker_pids)
    assert_gone(pids)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, hf_builtin_tokenizer) -> tuple[Any, str]:
    """Qwen2-MoE: routed experts (no renormalization) and a shared expert with its gate."""
    model = make_hf_moe("qwen2_moe")
    return model, str(save_folder(model, tmp_path_factory.mktemp("qwen2-moe-tp"),
                                  hf_builtin_tokenizer, True))


def test_tp2_moe_tensor_slices_every_expert_and_matches_transformers(
        tiny_moe, hf_builtin_tokenizer) -> None:
    reference, path = tiny_moe
    ids = hf_builtin_tokenizer.encode("Experts route each token: a short prompt with a few words.")
    num_tokens = 8
    expected, margin = hf_greedy(reference, ids, num_tokens)
    assert margin > 1e-3
    with make_llm(path, tensor_parallel_size=2, **SHARE_CORES) as llm:
        (output,) = run(llm, [ids], SamplingParams(temperature=0, max_tokens=num_tokens,
                                                   ignore_eos=True))
        assert output.token_ids == expected
        # routing counts come back from rank 0's worker process: every forwarded token went to
        # top-k experts in every sparse layer
        load = llm.engine.get_stats().expert_load
        top_k = reference.config.num_experts_per_tok
        assert [sum(row) for row in load.routed_tokens] == [
            (len(ids) + num_tokens - 1) * top_k] * reference.config.num_hidden_layers


def test_a_rank_killed_mid_generation_fails_the_engine_and_takes_every_rank(tiny_llama) -> None:
    with make_llm(tiny_llama, tensor_parallel_size=2, **SHARE_CORES) as llm:
        pids = list(llm.engine.executor.worker_pids)
        execute = llm.engine.executor.execute
        num_steps = 0

        def kill_rank_1_during_third_step(scheduler_output: Any) -> Any:
            nonlocal num_steps
            num_steps += 1
            if num_steps == 3:
                threading.Timer(0.01, os.kill, (pids[1], signal.SIGKILL)).start()
            return execute(scheduler_output)

        llm.engine.executor.execute = kill_rank_1_during_third_step
        started = time.monotonic()
        with pytest.raises(WorkerFailedError) as failure:
            llm.generate(["Once upon a time", "1, 2, 3,"], SamplingParams(
                max_tokens=200, temperature=0, ignore_eos=True), use_tqdm=False)
        error = failure.value
        assert time.monotonic() - started < FAILURE_DEADLINE_S
        # rank 0 may block in the all-reduce with its dead peer: it is killed with the rest
        assert f"worker rank 1 (pid {pids[1]}) was killed by SIGKILL" in str(error), error
        llm.engine.scheduler.check_no_leaks()
    assert_gone(pids)


def _arch(heads: int, kv_heads: int, intermediate: int = 128, **extra: Any) -> ArchConfig:
    return ArchConfig(architecture="llama", vocab_size=100, hidden_size=heads * 8,
                      intermediate_size=intermediate, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                      max_position_embeddings=64, **extra)


def _placement(arch: ArchConfig, ranks: int, **parallel: Any) -> None:
    config = EngineConfig(parallel=ParallelConfig(tensor_parallel_size=ranks, **parallel))
    check_parallel_placement(config, arch)


def test_a_tp_degree_the_model_or_machine_cannot_take_is_refused_before_any_worker() -> None:
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 does not divide the model's "
                                          "9 attention heads") as info:
        make_llm(tensor_parallel_size=2)
    assert info.value.param == "tensor_parallel_size"
    assert not worker_processes()

    from tokenmill.models.moe_config import MoeConfig

    moe = MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=60,
                    norm_topk_prob=True)
    with pytest.raises(ConfigError, match="does not divide the model's expert intermediate "
                                          "size 60"):
        _placement(_arch(8, 8, moe=moe), 8, **SHARE_CORES)

    cores = usable_cores()
    ranks = 2 ** cores.bit_length()  # more than the cores, and a divisor of the heads below
    with pytest.raises(ConfigError, match=f"tensor_parallel_size={ranks} needs one core per "
                                          f"rank, but this process may use {cores}"):
        _placement(_arch(ranks, ranks), ranks)
    _placement(_arch(ranks, ranks), ranks, **SHARE_CORES)  # allowed when asked for


@pytest.fixture(autouse=True)
def no_worker_left() -> Iterator[None]:
    yield
    assert not worker_processes()
