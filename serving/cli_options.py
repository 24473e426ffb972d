"""The options of `pensieve serve|cluster|router|chat`: dataclasses tyro makes a command line of.

Each field is an option (`max_model_len` -> `--max-model-len`), its docstring the help text. The
engine options are EngineConfig's own fields (pensieve_jax/engine/config.py), so every one of them,
bools included (`--prefix-sharing` / `--no-prefix-sharing`), is an option of `serve` and `cluster`
without a list kept here.
"""

import dataclasses
import sys
from typing import Annotated, Any, Literal, Sequence, Union

import tyro
from tyro.conf import FlagCreatePairsOff, OmitArgPrefixes, UseAppendAction, arg, subcommand

from pensieve_jax.engine.config import EngineConfig
from serving.limits import Limits
from serving.router import MAX_CONVERSATIONS, POLICIES

DEFAULT_PORT = 50051
Policy = Literal[POLICIES]      # type: ignore[valid-type]


@dataclasses.dataclass(frozen=True)
class RouterOptions:
    """router options"""
    policy: Policy = "e2"
    """How a conversation's replica is chosen."""
    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = DEFAULT_PORT
    """0: pick a free port."""
    health_period: float = 1.0
    """Seconds between health checks of the replicas."""
    rebalance_threshold: float = 2048.0
    """e2: move a conversation whose replica costs this many token-equivalents more than the cheapest."""
    kv_move: Literal["auto", "transfer", "recompute"] = "auto"
    """A moved conversation's KV: "transfer" (MemPool), "recompute", or "auto" (the cheaper, as measured)."""
    cache_report_interval: float = 1.0
    """Seconds between polls of each replica's MemPool.CacheReport (its evictions, imports); 0: never, guess by LRU."""
    max_conversations: int = MAX_CONVERSATIONS
    """Conversations the router remembers; beyond, the least recently used idle one is ended (0: no cap)."""


@dataclasses.dataclass(frozen=True)
class SecurityOptions:
    """security options"""
    api_key: Annotated[UseAppendAction[tuple[str, ...]], arg(metavar="KEY")] = ()
    """An API key callers must send (metadata authorization: Bearer KEY); repeat for more. Also --api-keys-file and the env PENSIEVE_API_KEY (safer: a command line is visible to other users). None: no authentication."""
    api_keys_file: str | None = None
    """A file of API keys, one per line (# comments)."""
    tls_cert: str | None = None
    """TLS: the server's certificate chain (PEM); with --tls-key."""
    tls_key: str | None = None
    """TLS: the server's private key (PEM)."""
    max_request_bytes: int = Limits().max_request_bytes
    """The largest request message accepted (bytes), refused by gRPC before it is parsed (RESOURCE_EXHAUSTED)."""


@dataclasses.dataclass(frozen=True)
class HttpOptions:
    """OpenAI-compatible HTTP API"""
    http_port: int | None = None
    """Also serve the OpenAI API (/v1/chat/completions, /v1/responses, ...) over HTTP on this port (0: a free one); TLS and keys as the gRPC port's."""
    served_model_name: str | None = None
    """The model name the HTTP API reports and accepts (default: --model)."""


@dataclasses.dataclass(frozen=True)
class Serve:
    """serve a model over gRPC"""
    model: str
    """smollm2-135m-instruct, a .gguf file, a Hugging Face or converted directory, or random:<preset>."""
    dtype: str = "float32"
    """The weights' and KV cache's dtype."""
    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = DEFAULT_PORT
    """0: pick a free port."""
    metrics_port: int | None = None
    """Serve Prometheus metrics over HTTP on this port (0: a free one)."""
    grace: float = 10.0
    """Seconds in-flight turns may finish at shutdown before they are cancelled."""
    no_cache_dir: FlagCreatePairsOff[bool] = False
    """Do not keep a converted copy of the model."""
    role: Literal["prefill", "decode", "both"] = "both"
    """What a router uses this replica for (prefill/decode disaggregation)."""
    max_conversations: int | None = None
    """Conversations kept; beyond, the least recently used idle one is ended (its cache freed). None: no cap."""
    state_dir: str | None = None
    """Keep Chat conversations across restarts in this directory (records, and the KV disk tier in DIR/kv)."""
    internal_host: str = "127.0.0.1"
    """Address the internal services (MemPool: KV reports and moves between replicas) bind."""
    internal_port: int = 0
    """Port of the internal services (0: a free one; printed at start)."""
    cluster_secret: str | None = None
    """The secret the internal services require (metadata x-pensieve-cluster-secret); better the env PENSIEVE_CLUSTER_SECRET. None: a random one (nobody else can use them)."""
    peer: Annotated[UseAppendAction[tuple[str, ...]], arg(metavar="HOST:PORT")] = ()
    """A peer's internal address KV may be transferred to (repeat for each); others are refused."""
    peer_tls_ca: str | None = None
    """Transfers to peers over TLS, trusting this CA (PEM)."""
    security: OmitArgPrefixes[SecurityOptions] = SecurityOptions()
    """Authentication, TLS and request size."""
    http: OmitArgPrefixes[HttpOptions] = HttpOptions()
    """The OpenAI HTTP API."""
    engine: OmitArgPrefixes[EngineConfig] = EngineConfig()
    """EngineConfig (pensieve_jax/engine/config.py)."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """N replica servers and a router in front of them"""
    model: str
    """The replicas' model (as `pensieve serve --model`)."""
    replicas: int | None = None
    """Replicas that prefill and decode; None: 2, or 0 with --prefill/--decode."""
    prefill: int = 0
    """Prefill-only replicas (disaggregation: prompts run there, their KV moves on through MemPool)."""
    decode: int = 0
    """Decode-only replicas."""
    dtype: str = "float32"
    """The weights' and KV cache's dtype."""
    subprocess: FlagCreatePairsOff[bool] = False
    """Run each replica as a `pensieve serve` process (default: in process, one copy of the weights)."""
    gpus: int = 0
    """With --subprocess: pin replica i to GPU i % GPUS."""
    routing: OmitArgPrefixes[RouterOptions] = RouterOptions()
    """How the router places conversations."""
    security: OmitArgPrefixes[SecurityOptions] = SecurityOptions()
    """The router's authentication (its replicas get the same keys), TLS and request size."""
    http: OmitArgPrefixes[HttpOptions] = HttpOptions()
    """The OpenAI HTTP API."""
    engine: OmitArgPrefixes[EngineConfig] = EngineConfig()
    """EngineConfig (pensieve_jax/engine/config.py)."""


@dataclasses.dataclass(frozen=True)
class Router:
    """a router in front of running replica servers"""
    replica: Annotated[UseAppendAction[tuple[str, ...]],
                       arg(metavar="HOST:PORT[,internal=[HOST:]PORT]")]
    """A replica server (repeat the option for each), with its internal port for KV reports and moves (else: none for it)."""
    model: str | None = None
    """The replicas' model, for its tokenizer (exact token ids for routing); None: key on UTF-8 bytes."""
    conversation_ttl_s: Annotated[float | None,
                                  arg(aliases=("--conversation-ttl",), metavar="SECONDS")] = None
    """Forget a conversation idle this long and end it on the replicas (as `pensieve serve` does); None: never."""
    replica_tls_ca: str | None = None
    """Reach the replicas over TLS, trusting this CA (PEM)."""
    cluster_secret: str | None = None
    """The replicas' cluster secret, for their internal ports; better the env PENSIEVE_CLUSTER_SECRET."""
    routing: OmitArgPrefixes[RouterOptions] = RouterOptions()
    """How the router places conversations."""
    security: OmitArgPrefixes[SecurityOptions] = SecurityOptions()
    """Authentication (the replicas must accept the same keys: calls go on with the caller's), TLS and request size."""
    http: OmitArgPrefixes[HttpOptions] = HttpOptions()
    """The OpenAI HTTP API."""

    def __post_init__(self):
        if not self.replica:
            raise ValueError("the router needs at least one --replica")


@dataclasses.dataclass(frozen=True)
class Chat:
    """chat with a server, replies streamed"""
    target: str = f"127.0.0.1:{DEFAULT_PORT}"
    """host:port"""
    api_key: str | None = None
    """The server's API key (default: the env PENSIEVE_API_KEY)."""
    tls_ca: str | None = None
    """Connect over TLS, trusting this CA or self-signed certificate (PEM)."""
    system: str | None = None
    """System prompt."""
    max_tokens: int = 256
    """Tokens a reply has at most."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens with this much probability."""
    top_k: int = 0
    """Sample among the k likeliest tokens (0: all)."""
    seed: int | None = None
    """Sampling seed (None: random)."""
    timeout: float | None = None
    """Deadline per turn, seconds."""


Command = Union[Annotated[Serve, subcommand("serve")], Annotated[Cluster, subcommand("cluster")],
                Annotated[Router, subcommand("router")], Annotated[Chat, subcommand("chat")]]


def parse_args(argv: Sequence[str] | None = None) -> Serve | Cluster | Router | Chat:
    """The command line (default: sys.argv[1:]) as the chosen subcommand's options. A bad option,
    or a value EngineConfig rejects, exits with status 2 and the reason."""
    return tyro.cli(Command, args=list(sys.argv[1:] if argv is None else argv), prog="pensieve",
                    description="Pensieve-JAX: stateful LLM serving over gRPC.",
                    config=(tyro.conf.OmitSubcommandPrefixes,))


def engine_options(args: Serve | Cluster) -> dict[str, Any]:
    """The EngineConfig fields the command line set to other than their defaults."""
    default = EngineConfig()
    return {f.name: getattr(args.engine, f.name) for f in dataclasses.fields(EngineConfig)
            if getattr(args.engine, f.name) != getattr(default, f.name)}


def engine_flags(options: dict[str, Any]) -> list[str]:
    """EngineConfig fields as `pensieve serve` options: the inverse of engine_options."""
    switches = {f.name for f in dataclasses.fields(EngineConfig) if f.type in (bool, "bool")}
    flags = []
    for name, value in options.items():
        flag = f"--{name.replace('_', '-')}"
        if name in switches:
            flags.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, (tuple, list)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags
