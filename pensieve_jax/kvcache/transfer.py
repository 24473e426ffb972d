"""Export and import of a conversation's KV pages between engines (MemServe's MemPool transfer).

    kv = engine_a.export_kv("conv-1")                  # ExportedKV: token ids + k/v pages
    engine_b.import_kv("conv-1", kv.token_ids, kv.k, kv.v, kv.layout)

Export takes the longest prefix [0, n) of an idle conversation whose pages have a copy on the
device or the host tier (its own pages, or the prefix index's for pages it let go), starting at
page `start // page_size`. Import creates (or extends) an idle conversation holding those tokens:
it makes room, allocates device pages, writes them, and registers the full pages for prompt
sharing. An import starting past page 0 extends a conversation (by id, or the anonymous one
sharing the longest prefix) that already holds the tokens before it. The functions here take
the engine's parts (`KVParts`) and run on the engine thread: Engine.export_kv / import_kv call
them through `call_settled(engine.call, ...)`.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np

from pensieve_jax.kvcache.conversations import Conversation, ConversationStore, common_prefix
from pensieve_jax.kvcache.errors import ConversationBusy
from pensieve_jax.kvcache.host_cache import HostCache
from pensieve_jax.kvcache.pages import OutOfPages
from pensieve_jax.model.config import ModelConfig

__all__ = ["ConversationBusy", "ExportedKV", "KVLayout", "KVMismatch", "KVParts",
           "NoSuchConversation", "OutOfPages", "PageIO", "call_settled", "export_kv",
           "import_kv", "layout_of", "match", "numpy_dtype"]


class KVMismatch(ValueError):
    """The pages do not fit this engine (model, page size, shape, dtype) or this conversation."""


class NoSuchConversation(LookupError):
    """The engine holds no such conversation."""


class _Flushing(ConversationBusy):
    """The turn is done but for its cache flush (the next engine step)."""


class PageIO(Protocol):
    """The device page reads and writes a transfer needs (ModelRunner's)."""
    dtype: np.dtype

    def gather_pages_host(self, page_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """k, v of device pages [layers, n, ...], in host memory."""

    def scatter_pages(self, k: np.ndarray, v: np.ndarray, page_ids: list[int]) -> None:
        """Write k, v [layers, n, ...] into device pages."""


class KVParts(NamedTuple):
    """The parts of an engine an export or import works on (Engine.export_kv / import_kv)."""
    store: ConversationStore
    pages: PageIO                   # device pages (the runner)
    host: HostCache                 # host pages
    model: ModelConfig
    max_model_len: int
    settle: Callable[[], None]      # run the page copies planned so far (Engine.settle_copies)


def _check_idle(conv: Conversation) -> None:
    if conv.flushing:
        raise _Flushing(f"conversation {conv.id!r} is flushing its last turn")
    if conv.busy:
        raise ConversationBusy(f"conversation {conv.id!r} has a turn running")


def call_settled(call, fn, timeout_s: float = 10.0):
    """call(fn), retried while fn finds a conversation still flushing its last turn (that ends
    at the engine's next step). call runs fn on the engine thread (Engine.call)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call(fn)
        except _Flushing:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


class KVLayout(NamedTuple):
    """What a page is: both sides of a transfer must agree on all of it."""
    model: str
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        """k (or v) of one page: [layers, page_size, kv_heads, head_dim]."""
        return (self.num_layers, self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        """k + v bytes of one page."""
        return 2 * math.prod(self.page_shape) * np.dtype(numpy_dtype(self.dtype)).itemsize


class ExportedKV(NamedTuple):
    """A conversation's tokens [0, num_tokens) and the KV of pages first_page.. of them."""
    token_ids: tuple[int, ...]
    first_page: int
    k: np.ndarray            # [layers, pages, page_size, kv_heads, head_dim]
    v: np.ndarray
    layout: KVLayout
    salt: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def numpy_dtype(name: str):
    """The numpy dtype of a KVLayout.dtype name ("bfloat16" through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(name)


def layout_of(parts: KVParts) -> KVLayout:
    """The layout of the parts' pages."""
    c = parts.model
    return KVLayout(c.name, c.num_layers, parts.store.page_size, c.num_kv_heads, c.head_dim,
                    parts.pages.dtype.name)


def _find(store: ConversationStore, conversation_id: str | None, token_ids: Sequence[int],
          salt: str) -> Conversation | None:
    if conversation_id:
        return store.conversations.get(conversation_id)
    best, best_len = None, 0
    for conv in store.conversations.values():
        if conv.anonymous and conv.salt == salt and not conv.busy:
            n = common_prefix(conv.token_ids[:conv.num_computed], token_ids)
            if n > best_len:
                best, best_len = conv, n
    return best


def match(store: ConversationStore, conversation_id: str | None, token_ids: Sequence[int],
          salt: str = "") -> tuple[int, int]:
    """(tokens of token_ids the conversation holds in a tier, tokens the prefix index can
    serve). Without an id, the anonymous conversation sharing the longest prefix counts.
    Raises _Flushing while its last turn's cache flush is still to run (call_settled waits
    for it): a turn whose reply has arrived then counts whole. Runs on the engine thread."""
    conv = _find(store, conversation_id, token_ids, salt)
    if conv is not None and conv.flushing:
        raise _Flushing(f"conversation {conv.id!r} is flushing its last turn")
    own = 0
    if conv is not None and conv.salt == salt:
        own = min(common_prefix(conv.token_ids, token_ids), store.held_tokens(conv))
    shared = 0
    if store.index is not None and token_ids:
        nodes, partial = store.index.match(salt, list(token_ids), len(token_ids))
        shared = store.index.matched_tokens(nodes, partial)
    return own, shared


def export_kv(parts: KVParts, conversation_id: str, start: int = 0,
              limit: int | None = None) -> ExportedKV:
    """The KV of an idle conversation's held prefix (at most `limit` tokens), from the page
    holding token `start` on. Runs on the engine thread."""
    conv = parts.store.conversations.get(conversation_id)
    if conv is None:
        raise NoSuchConversation(f"no conversation {conversation_id!r}")
    _check_idle(conv)
    parts.settle()
    ps = parts.store.page_size
    sources = parts.store.ledger.sources(conv)
    n = min(conv.num_computed, len(sources) * ps, limit if limit is not None else conv.num_computed)
    first = min(max(start, 0) // ps, n // ps) if n else 0
    sources = sources[first:-(-n // ps)]
    layout = layout_of(parts)
    dtype = numpy_dtype(layout.dtype)
    k = np.empty((layout.num_layers, len(sources)) + layout.page_shape[1:], dtype)
    v = np.empty_like(k)
    for tier in ("device", "host"):
        slots = [j for j, (t, _) in enumerate(sources) if t == tier]
        if not slots:
            continue
        ids = [sources[j][1] for j in slots]
        if tier == "device":
            dk, dv = parts.pages.gather_pages_host(ids)
        else:
            dk, dv = parts.host.read(ids)
        k[:, slots], v[:, slots] = dk, dv
    return ExportedKV(tuple(conv.token_ids[:n]), first, k, v, layout, conv.salt)


def import_kv(parts: KVParts, conversation_id: str | None, token_ids: Sequence[int],
              k: np.ndarray, v: np.ndarray, layout: KVLayout, first_page: int = 0,
              salt: str = "") -> str:
    """Make an idle conversation hold token_ids with the given KV (pages first_page.. of them;
    the conversation must already hold the tokens before). conversation_id None: the anonymous
    conversation sharing the longest prefix, or a new one. Returns the conversation's id. Runs
    on the engine thread."""
    mine = layout_of(parts)
    if layout != mine:
        raise KVMismatch(f"KV layout {layout} does not match this engine's {mine}")
    ps, tokens = mine.page_size, [int(t) for t in token_ids]
    n_pages = -(-len(tokens) // ps) - first_page
    want = (mine.num_layers, n_pages) + mine.page_shape[1:]
    if k.shape != want or v.shape != want or n_pages < 0:
        raise KVMismatch(f"k/v of shape {k.shape}/{v.shape} for {len(tokens)} tokens from page "
                         f"{first_page}; expected {want}")
    if str(k.dtype) != mine.dtype or str(v.dtype) != mine.dtype:
        raise KVMismatch(f"k/v dtype {k.dtype}/{v.dtype}, expected {mine.dtype}")
    if len(tokens) > parts.max_model_len:
        raise KVMismatch(f"{len(tokens)} tokens exceed max_model_len {parts.max_model_len}")
    vocab = parts.model.vocab_size
    if any(not 0 <= t < vocab for t in tokens):
        raise KVMismatch(f"token ids out of range [0, {vocab})")
    store = parts.store
    conv = _find(store, conversation_id, tokens, salt)
    if conv is not None:
        _check_idle(conv)
    start = first_page * ps
    if start:
        held = 0 if conv is None or conv.salt != salt else \
            min(common_prefix(conv.token_ids, tokens), store.held_tokens(conv))
        if held < start:
            raise KVMismatch(f"the import starts at token {start} but the conversation holds "
                             f"only {held} of them")
    elif conv is not None and conv.salt != salt:      # replaced: its salt goes with it
        store.remove(conv.id)
        conv = None
    if conv is None:
        conv = store.get_or_create(conversation_id, tokens, salt)
        if conversation_id is None and conv.token_ids:          # adopted a non-matching one
            conv = store.new_anonymous(salt)
    store.truncate(conv, start)
    conv.busy = True              # not an eviction victim while its pages are written
    try:
        if not store.make_room(n_pages):
            raise OutOfPages(f"no room for {n_pages} KV pages ({store.allocator.num_free} free "
                             "after evicting idle conversations)")
        parts.settle()            # evicted pages leave for the host before they are reused
        if not store.reserve(conv, len(tokens)):
            raise OutOfPages(f"no room for {n_pages} KV pages")
        if n_pages:
            parts.pages.scatter_pages(k, v, conv.pages[first_page:first_page + n_pages])
        conv.token_ids = tokens
        conv.num_computed = len(tokens)
    except BaseException:
        store.truncate(conv, start)
        store.release(conv, keep_kv=True)
        raise
    store.release(conv, keep_kv=True)
    return conv.id
