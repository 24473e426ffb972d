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
