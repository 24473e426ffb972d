"""The engine: a loop of schedule -> run -> postprocess over conversations that keep their cache.

Callers on any thread `submit` turns (or use `generate` / `session`); one background thread
(engine/worker.py) owns all scheduling state and runs the steps (engine/loop.py), so requests
join and leave at step boundaries; a turn's life is in engine/turns.py. The Engine composes
its parts (engine/parts.py) and is what callers hold.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, Callable, Sequence

import jax  # noqa: F401 (before the atexit hook below: see _close_open_engines)

from pensieve_jax.engine.buffers import free_buffers
from pensieve_jax.engine.config import EngineConfig
from pensieve_jax.engine.errors import EngineClosed, EngineOverloaded  # noqa: F401 (API)
from pensieve_jax.engine.history import ConversationHistory
from pensieve_jax.engine.kept_sessions import KeptSessions, open_state_dir
from pensieve_jax.engine.kv_exchange import KVExchange
from pensieve_jax.engine.loop import StepLoop
from pensieve_jax.engine.parts import MakeRunner, build
from pensieve_jax.engine.request import RequestHandle, check_text_bytes, text_byte_limit
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.engine.state_store import ConversationRecord
from pensieve_jax.engine.stats import engine_stats
from pensieve_jax.engine.turn_io import checked_request, submit_and_wait, without_stop
from pensieve_jax.engine.turns import Turns
from pensieve_jax.engine.worker import EngineThread, overlaps
from pensieve_jax.kvcache import report, transfer as kv_transfer
from pensieve_jax.tokenizer import Tokenizer
from pensieve_jax.weights import DEFAULT_MODEL, LoadedModel, load_model

# Every engine not yet closed, without keeping any alive; closed at interpreter exit.
_open_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    """An engine thread left inside a JAX call (a step in flight) when the interpreter
    finalizes is ended by CPython with pthread_exit as it takes the GIL back; the forced unwind
    through jaxlib's C++ frames aborts the process (exit 134, "FATAL: exception not
    rethrown"). atexit hooks run before that, last registered first: this one (this module
    imports JAX first) before JAX's own, which clear its backends."""
    for engine in list(_open_engines):
        try:
            engine.close()
        except Exception:  # exiting anyway; close the others
            pass


class Engine:
    """Serves turns of conversations that keep their KV cache (see the module's docstring);
    composed of its parts (engine/parts.py), the step loop, its thread and the KV exchange."""

    def __init__(self, model: LoadedModel, dtype="float32", config: EngineConfig = EngineConfig(),
                 make_runner: MakeRunner | None = None, state_dir: str | None = None):
        """make_runner(num_pages, token_ladder): the runner to drive instead of a ModelRunner
        of `model` (the device seam, runner/seam.py; tests drive a runner without a device).
        state_dir: keep named sessions there across restarts (engine/kept_sessions.py)."""
        if state_dir is not None:   # StateDirMismatch (another model or layout) before building
            config, records = open_state_dir(state_dir, model, config, dtype)
        self.model, self.config = model, config
        self.parts = parts = build(model, dtype, config, make_runner)
        # the conversations the state_dir keeps (engine/kept_sessions.py); None: no state_dir
        self.kept = KeptSessions(self, records) if state_dir is not None else None
        self.max_model_len, self.runner = parts.max_model_len, parts.runner
        self.allocator, self.host, self.store = parts.allocator, parts.host, parts.store
        self.scheduler, self.swapper = parts.scheduler, parts.swapper
        self.attention_choice = parts.attention
        self.max_text_bytes = text_byte_limit(model.tokenizer, self.max_model_len)
        self.turns = Turns(parts.scheduler, parts.store, config, model.tokenizer,
                           parts.max_model_len)
        self.counts = self.turns.counts             # engine thread only; see stats()
        self.steps = StepLoop(config, parts.runner, parts.scheduler, parts.store, parts.swapper,
                              parts.rates, self.turns, parts.allocator.num_pages)
        self.loop = self.steps.times
        self.thread = EngineThread(self.steps, parts.store, config.conversation_ttl_s)
        # conversations' token histories, the process's one copy (engine/history.py)
        self.history = ConversationHistory(parts.store, parts.scheduler, self.turns, self.steps,
                                           self.thread, model.config.vocab_size,
                                           parts.max_model_len)
        self.owns_weights = False            # from_pretrained loaded them: close() frees them
        self.kv_exchange = KVExchange(self.call, kv_transfer.KVParts(
            parts.store, parts.runner, parts.host, model.config, parts.max_model_len,
            self.steps.settle_copies))
        _open_engines.add(self)
        if config.precompile_enabled:
            self.warm_up()

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT_MODEL, dtype="float32", cache_dir=None,
                        state_dir: str | None = None, **options) -> "Engine":
        """source: a .gguf path, a Hugging Face directory, a converted (orbax) directory,
        random:<preset>, or the alias smollm2-135m-instruct. options: EngineConfig fields."""
        engine = cls(load_model(source, dtype, cache_dir), dtype,
                     EngineConfig.from_options(options), state_dir=state_dir)
        engine.owns_weights = True
        # keep the weights as the runner's programs take them (copies where its layout or mesh
        # differs from the loaded one), not the loaded tree beside them
        engine.model = engine.model._replace(params=engine.runner.params)
        return engine

    def warm_up(self) -> None:
        """Compile every program the engine can run (the runner's program set, page copies) on
        the engine thread, before any request; turns submitted meanwhile wait behind it. Logs a
        line per program. Idempotent. After it, `ready` is True and any compile on the engine
        thread is a bug: logged as a warning and counted in stats()["programs"]."""
        if not self.runner.ready:
            self.call(self.parts.warm_up.run)

    @property
    def warm_up_s(self) -> float | None:
        """Seconds warm_up took (None: it did not run)."""
        return self.parts.warm_up.seconds

    @property
    def ready(self) -> bool:
        """Every program is compiled (warm_up ran); a lazy engine (precompile off) is never."""
        return self.runner.ready

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    # -- public, thread-safe ------------------------------------------------------------------

    def submit(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
               conversation_id: str | None = None, cache_salt: str | None = None) -> RequestHandle:
        """Queue one turn. prompt_token_ids is the conversation's whole sequence (history + new
        turn); the longest prefix still cached for `conversation_id` (or, without an id, for the
        anonymous conversation that shares it), or by any conversation of the same
        `cache_salt` (prompt sharing), is reused. Raises EngineOverloaded beyond
        max_queued_requests unfinished turns; ValueError for bad input, naming the field."""
        req = checked_request(prompt_token_ids, params, conversation_id, cache_salt,
                              self.model.config.vocab_size, self.max_model_len, self.cancel)
        self.turns.admit()
        self.thread.post(overlaps(lambda: self.turns.add(req)))
        return req.handle

    def check_text(self, nbytes: int, field: str = "prompt") -> None:
        """ValueError naming field if a text of nbytes UTF-8 bytes cannot fit max_model_len."""
        check_text_bytes(nbytes, self.max_text_bytes, field, self.max_model_len)

    def generate(self, prompt_token_ids, params: SamplingParams | None = None):
        """Generate for one prompt (a list of ids) or a batch (a list of lists). Returns the new
        token ids per prompt, without a final stop token."""
        return submit_and_wait(self.submit, prompt_token_ids, params)

    strip_stop = staticmethod(without_stop)     # an output's token ids, no final stop token

    def session(self, system: str | None = None, history=None, cache_salt: str | None = None,
                conversation_id: str | None = None):
        """A Session (one conversation); history: earlier messages to start from; cache_salt:
        share cached prompt pages only with requests of the same salt (tenant isolation);
        conversation_id: its name (with a state_dir: kept until closed, or continued)."""
        from pensieve_jax.session import Session     # the layer above: a convenience
        return Session(self, system, history, cache_salt, conversation_id)

    def kept_conversations(self) -> list[ConversationRecord]:
        """The conversations kept in the state_dir, least recently updated first ([]: none)."""
        return self.kept.records() if self.kept is not None else []

    def cancel(self, request_id: str) -> None:
        """Stop a turn now; its conversation keeps the tokens produced so far."""
        try:
            self.thread.post(lambda: self.turns.abort(request_id))
        except EngineClosed:      # close() ended every turn
            pass

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between steps; its result or exception comes back."""
        return self.thread.call(fn)

    def has_conversation(self, conversation_id: str) -> bool:
        return self.call(lambda: conversation_id in self.store.conversations)

    def end_conversation(self, conversation_id: str) -> bool:
        """Free a conversation's cache (after its running turn, if any). False if unknown."""
        return self.call(lambda: self.store.end(conversation_id))

    def stats(self) -> dict[str, Any]:
        return self.call(lambda: engine_stats(self.parts, self.config, self.steps))

    # -- KV between engines (engine/kv_exchange.py), the cache's contents (kvcache/report.py) -

    def export_kv(self, conversation_id: str, start: int = 0, limit: int | None = None):
        """An idle conversation's KV as kv_transfer.ExportedKV: KVExchange.export_kv."""
        return self.kv_exchange.export_kv(conversation_id, start, limit)

    def import_kv(self, conversation_id: str | None, token_ids, k, v, layout,
                  first_page: int = 0, cache_salt: str | None = None) -> str:
        """Make an idle conversation hold token_ids, k, v: KVExchange.import_kv."""
        return self.kv_exchange.import_kv(conversation_id, token_ids, k, v, layout, first_page,
                                          cache_salt)

    def match_kv(self, conversation_id: str | None, token_ids: Sequence[int],
                 cache_salt: str = "") -> tuple[int, int]:
        """What of token_ids need not be sent here: KVExchange.match_kv."""
        return self.kv_exchange.match_kv(conversation_id, token_ids, cache_salt)

    def kv_layout(self) -> kv_transfer.KVLayout:
        """The layout of this engine's KV pages (what an import must match)."""
        return self.kv_exchange.kv_layout()

    def computed_tokens(self, conversation_id: str) -> tuple[list[int], str] | None:
        """A conversation's tokens whose KV it computed, and its cache salt (None: unknown)."""
        def read():
            conv = self.store.conversations.get(conversation_id)
            return None if conv is None else (list(conv.token_ids[:conv.num_computed]), conv.salt)
        return self.call(read)

    def cache_scan(self, previous):
        """What the cache holds: kvcache.report.Held per conversation holding KV, reusing the
        entries of `previous` that did not change (read on the engine thread; CacheTracker)."""
        return self.call(lambda: report.scan(self.store, previous))

    # -- life cycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the engine: kept conversations' idle KV to page files (state_dir), turns still
        queued or running end with EngineClosed, the engine thread exits and the device buffers
        go (the KV pools; the weights too if from_pretrained loaded them and no open engine
        shares them). Idempotent; afterwards submit, call and what uses them raise EngineClosed.
        `with Engine...(...) as engine:` closes on the way out, and so does interpreter exit."""
        if self.kept is not None and not self.closed:
            self.kept.shut()

        def end_all() -> None:
            self.swapper.drop()
            self.turns.end_all(EngineClosed("the engine was closed"))
        if self.thread.stop(end_all):
            _open_engines.discard(self)
            shared = any(e.model.params is self.model.params for e in _open_engines)
            free_buffers(self.runner, self.model.params, self.owns_weights and not shared)

    shutdown = close      # the earlier name

    @property
    def closed(self) -> bool:
        return self.thread.closed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
