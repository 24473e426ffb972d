"""The `pensieve` command line (serving/cli.py, serving/cli_options.py) and the client's retry
policy (serving/client.py): no engine, no model."""

from __future__ import annotations

import dataclasses
import re
from concurrent import futures

import docstring_parser
import grpc
import pytest

from pensieve_jax.engine.config import EngineConfig
from serving.cli import engine_flags, engine_options, main, parse_args
from serving.client import connect
from serving.errors import Unavailable
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc


def help_text(capsys, monkeypatch, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "400")       # no wrapped words
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())


@pytest.mark.parametrize("command", ["serve", "cluster"])
def test_every_engine_option_is_listed_with_its_help(capsys, monkeypatch, command):
    text = help_text(capsys, monkeypatch, command)
    docs = {p.arg_name: p.description
            for p in docstring_parser.parse_from_object(EngineConfig).params}
    for field in dataclasses.fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        assert re.search(re.escape(flag) + r"\b", text), flag
        assert docs.get(field.name), f"EngineConfig.{field.name} has no docstring"
        assert " ".join(docs[field.name].split()) in text, field.name
    for switch in ("prefix-sharing", "overlap"):
        assert f"--{switch}, --no-{switch}" in text


def test_a_bool_option_turned_off_reaches_engine_config():
    args = parse_args(["serve", "--model", "random:tiny", "--no-prefix-sharing", "--no-overlap"])
    options = engine_options(args)
    assert options == {"prefix_sharing": False, "overlap": False}
    config = EngineConfig(**options)
    assert (config.prefix_sharing, config.overlap) == (False, False)
    assert EngineConfig(**engine_options(parse_args(["serve", "--model", "m"]))) == EngineConfig()


def test_engine_flags_are_what_serve_parses():
    options = {"prefix_sharing": False, "overlap": True, "precompile": False, "num_pages": 64,
               "token_buckets": (1, 8, 32), "max_batched_tokens": 32, "attention": "xla",
               "kv_cache_fraction": 0.5}
    args = parse_args(["serve", "--model", "m", *engine_flags(options)])
    assert engine_options(args) == {k: v for k, v in options.items() if k != "overlap"}


def test_non_engine_options_keep_their_names():
    args = parse_args(["serve", "--model", "m", "--port", "0", "--metrics-port", "9090",
                       "--no-cache-dir", "--role", "decode", "--grace", "2", "--page-size=256"])
    assert (args.port, args.metrics_port, args.no_cache_dir, args.role, args.grace) == \
        (0, 9090, True, "decode", 2.0)
    assert args.engine.page_size == 256
    args = parse_args(["cluster", "--model", "m", "--prefill", "1", "--decode", "2",
                       "--subprocess", "--gpus", "2", "--policy", "affinity", "--kv-move",
                       "recompute", "--cache-report-interval", "0", "--max-model-len", "1024"])
    assert (args.prefill, args.decode, args.subprocess, args.gpus) == (1, 2, True, 2)
    assert (args.routing.policy, args.routing.kv_move, args.routing.cache_report_interval) == \
        ("affinity", "recompute", 0.0)
    assert engine_options(args) == {"max_model_len": 1024}
    args = parse_args(["router", "--replica", "a:1", "--replica", "b:2", "--port", "0"])
    assert (args.replica, args.routing.port) == (("a:1", "b:2"), 0)
    args = parse_args(["chat", "--target", "h:1", "--system", "Be brief.", "--max-tokens", "9",
                       "--top-p", "0.5", "--seed", "3", "--timeout", "4"])
    assert (args.target, args.system, args.max_tokens, args.top_p, args.seed, args.timeout) == \
        ("h:1", "Be brief.", 9, 0.5, 3, 4.0)


@pytest.mark.parametrize("argv", [["serve", "--model", "m", "--page-size", "3"],
                                  ["serve", "--model", "m", "--prefix-sharing", "False"],
                                  ["router"], ["serve"]])
def test_bad_options_exit_with_usage(capsys, argv):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2


class FlakyStats(pb_grpc.PensieveServicer):
    """GetStats fails UNAVAILABLE `failures` times, then answers."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0

    def GetStats(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return pb.GetStatsResponse(stats_json="{}")


@pytest.fixture
def flaky():
    servicer = FlakyStats(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_PensieveServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_the_channel_retries_unavailable(flaky):
    servicer, target = flaky
    with connect(target, timeout=30) as client:
        assert client.stats() == {}
    assert servicer.calls == 3


def test_a_caller_service_config_replaces_the_retry_policy(flaky):
    servicer, target = flaky
    with connect(target, timeout=30, options=[("grpc.service_config", "{}")]) as client:
        with pytest.raises(Unavailable):
            client.stats()
    assert servicer.calls == 1


# -- security and HTTP options (issue 20) ------------------------------------------------------

def test_security_options_parse():
    args = parse_args(["serve", "--model", "m", "--api-key", "a", "--api-key", "b",
                       "--api-keys-file", "keys.txt", "--tls-cert", "c.pem", "--tls-key", "k.pem",
                       "--max-request-bytes", "65536", "--max-conversations", "100",
                       "--internal-host", "10.0.0.1", "--internal-port", "7001",
                       "--cluster-secret", "s", "--peer", "10.0.0.2:7001", "--peer",
                       "10.0.0.3:7001", "--peer-tls-ca", "ca.pem", "--http-port", "8000",
                       "--served-model-name", "tiny"])
    sec = args.security
    assert (sec.api_key, sec.api_keys_file, sec.tls_cert, sec.tls_key, sec.max_request_bytes) \
        == (("a", "b"), "keys.txt", "c.pem", "k.pem", 65536)
    assert (args.max_conversations, args.internal_host, args.internal_port, args.cluster_secret,
            args.peer, args.peer_tls_ca) == \
        (100, "10.0.0.1", 7001, "s", ("10.0.0.2:7001", "10.0.0.3:7001"), "ca.pem")
    assert (args.http.http_port, args.http.served_model_name) == (8000, "tiny")
    assert engine_options(args) == {}
    defaults = parse_args(["serve", "--model", "m"])
    assert (defaults.security.api_key, defaults.security.max_request_bytes,
            defaults.internal_host, defaults.internal_port, defaults.http.http_port) == \
        ((), 4 << 20, "127.0.0.1", 0, None)
    args = parse_args(["router", "--replica", "a:1,internal=2", "--replica", "b:1",
                       "--api-key", "k", "--tls-cert", "c", "--tls-key", "k",
                       "--replica-tls-ca", "ca", "--cluster-secret", "s", "--http-port", "0"])
    assert (args.replica, args.replica_tls_ca, args.cluster_secret, args.security.api_key,
            args.http.http_port) == (("a:1,internal=2", "b:1"), "ca", "s", ("k",), 0)
    args = parse_args(["cluster", "--model", "m", "--api-key", "k", "--tls-cert", "c",
                       "--tls-key", "k", "--max-request-bytes", "2048", "--http-port", "0",
                       "--served-model-name", "x"])
    assert (args.security.api_key, args.security.max_request_bytes, args.http.http_port,
            args.http.served_model_name) == (("k",), 2048, 0, "x")
    args = parse_args(["chat", "--api-key", "k", "--tls-ca", "ca.pem"])
    assert (args.api_key, args.tls_ca) == ("k", "ca.pem")


@pytest.mark.parametrize("argv, message", [
    (["serve", "--model", "random:tiny", "--tls-cert", "/nonexistent/c.pem", "--tls-key",
      "/nonexistent/k.pem"], "tls_cert: no such file"),
    (["serve", "--model", "random:tiny", "--tls-cert", "c.pem"], "--tls-cert and --tls-key"),
    (["serve", "--model", "random:tiny", "--api-keys-file", "/nonexistent/keys"],
     "--api-keys-file"),
    (["serve", "--model", "random:tiny", "--max-request-bytes", "10"], "max_request_bytes"),
    (["router", "--replica", "a:1", "--replica-tls-ca", "/nonexistent/ca.pem"],
     "--replica-tls-ca: no such file"),
])
def test_bad_security_options_exit_2_with_the_reason(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
