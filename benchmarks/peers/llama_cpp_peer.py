"""llama.cpp as a benchmark peer, through llama-cpp-python's C API (ctypes), served the way
llama.cpp's own server serves: `n_seq` slots (one KV sequence each, kept between the turns of
the conversation that holds the slot, so a turn evaluates only its new tokens: the server's
prompt cache), continuous batching (every step decodes one token for each generating slot and
fills the rest of the `n_batch` token budget with prompt tokens), greedy sampling (argmax of
the logits, first index on ties, as jnp.argmax). A single conversation is plain llama.cpp at
batch 1.

    llm = LlamaCpp("model-f32.gguf", n_threads=2, n_seq=4)
    target = LlamaCppTarget(llm)     # peers/llama_cpp_target.py: the slots and their worker

Optional: needs llama-cpp-python (`pip install -e ".[peers]"`, a CPU build of llama.cpp
compiled from source); `available()` says whether it imports.
"""

from __future__ import annotations

import ctypes

import numpy as np

KV_TYPES = {"f32": 0, "f16": 1}          # ggml_type
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}


def available() -> tuple[bool, str | None]:
    """(whether llama_cpp imports, its version or why not)."""
    try:
        import llama_cpp
    except Exception as e:    # ImportError, or a shared library that fails to load
        return False, f"{type(e).__name__}: {e}"
    return True, getattr(llama_cpp, "__version__", "?")


_LOG_SINK = None


def _quiet(L) -> None:
    """Send llama.cpp's log lines nowhere (the callback must outlive the process's calls)."""
    global _LOG_SINK
    if _LOG_SINK is None:
        _LOG_SINK = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(_LOG_SINK, ctypes.c_void_p(0))


class LlamaCpp:
    """One llama.cpp model and context with n_seq sequences of n_ctx_seq tokens each.
    Not thread-safe: one thread drives it (LlamaCppTarget's worker)."""

    def __init__(self, gguf_path: str, *, n_threads: int = 2, n_seq: int = 1,
                 n_ctx_seq: int = 2048, n_batch: int = 512, kv_type: str = "f32",
                 flash_attn: str = "auto", verbose: bool = False):
        import llama_cpp as L
        self.L = L
        if not verbose:
            _quiet(L)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx_seq * n_seq
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.type_k = cp.type_v = KV_TYPES[kv_type]
        cp.flash_attn_type = FLASH_ATTN[flash_attn]
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model)))
        self.mem = L.llama_get_memory(self.ctx)
        self.n_batch, self.n_seq, self.n_ctx_seq = n_batch, n_seq, n_ctx_seq
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.settings = {"n_threads": n_threads, "n_seq": n_seq, "n_ctx_seq": n_ctx_seq,
                         "n_batch": n_batch, "n_ubatch": n_batch, "kv_type": kv_type,
                         "flash_attn": flash_attn, "n_vocab": self.n_vocab,
                         "sampling": "greedy (numpy argmax of the logits)"}

    def clear(self, seq: int, start: int = 0) -> None:
        """Drop sequence seq's KV from position start on."""
        self.L.llama_memory_seq_rm(self.mem, seq, start, -1)

    def decode(self, entries: list[tuple[int, list[int], int]]) -> list[int | None]:
        """One llama_decode of several sequences' tokens: entries (seq, tokens, first position),
        at most n_batch tokens in all. Logits of each entry's last token; returns its argmax
        (None for an entry with no tokens)."""
        L, b = self.L, self.batch
        n, last = 0, []
        for seq, toks, pos in entries:
            for j, t in enumerate(toks):
                b.token[n] = int(t)
                b.pos[n] = pos + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq
                b.logits[n] = 0
                n += 1
            if toks:
                b.logits[n - 1] = 1
            last.append(n - 1 if toks else None)
        if n > self.n_batch:
            raise ValueError(f"{n} tokens in one decode; n_batch is {self.n_batch}")
        b.n_tokens = n
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out: list[int | None] = []
        for i in last:
            if i is None:
                out.append(None)
                continue
            ptr = L.llama_get_logits_ith(self.ctx, i)
            out.append(int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))))
        return out

    def logits(self, tokens: list[int], seq: int = 0) -> np.ndarray:
        """The logits after `tokens` (a fresh sequence in slot seq, cleared before and after).
        Only while no LlamaCppTarget worker drives this model."""
        self.clear(seq, 0)
        for start in range(0, len(tokens), self.n_batch):
            self.decode([(seq, list(tokens[start:start + self.n_batch]), start)])
        ptr = self.L.llama_get_logits_ith(self.ctx, -1)
        out = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        self.clear(seq, 0)
        return out

    def close(self) -> None:
        L = self.L
        if self.ctx:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            self.ctx = self.model = None
