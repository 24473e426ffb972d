"""The tokenization the router keys its prefix tree on.

With the model's tokenizer (`load_router_tokenizer`), the router computes each turn's prompt ids
exactly as the replica's Session does (chat template, then the previous turn's exact ids plus
the newly rendered text), so the prefix tree holds the replicas' real token ids, and a
conversation moved to another replica is sent with its exact ids (ChatRequest.history_token_ids)
and continues on the identical token sequence. Without a tokenizer the tree is keyed on the
UTF-8 bytes of a plain rendering of the messages: prefixes still line up, lengths are in bytes
rather than tokens, and a moved conversation is re-encoded from its text by the replica.
"""

from __future__ import annotations


def load_router_tokenizer(model: str | None):
    """The tokenizer of `model` (random:<preset> builds it without weights), or None."""
    if not model:
        return None
    if model.startswith("random:"):
        from pensieve_jax.model.config import PRESETS
        from pensieve_jax.tokenizer import Tokenizer
        return Tokenizer.byte_level(PRESETS[model.split(":", 1)[1]].vocab_size)
    from pensieve_jax.weights import load_model
    return load_model(model).tokenizer      # loads the weights too (once, at router start)


class ChatKeys:
    """Token ids of chat turns, as the replicas compute them (or bytes without a tokenizer)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    @property
    def exact(self) -> bool:
        """Whether the ids are the replicas' own token ids (a tokenizer was given)."""
        return self.tokenizer is not None

    def prompt_ids(self, template: list[dict[str, str]], ids: list[int],
                   turn: list[dict[str, str]]) -> list[int]:
        """The ids of the conversation plus the new turn (as Session computes them)."""
        if self.tokenizer is None:
            return list("".join(f"<|{m['role']}|>{m['content']}\n"
                                for m in template + turn).encode())
        return self.tokenizer.encode_chat(template + turn, prefix_ids=ids)

    def generate_ids(self, text: str) -> list[int]:
        """The ids of a Generate prompt given as text."""
        if self.tokenizer is None:
            return list(text.encode())
        return self.tokenizer.encode(text, add_special_tokens=True)

    def raw_reply(self, text: str, ids: list[int], stop_strings: bool) -> str:
        """An assistant message as the replica's chat template saw it: the reply's ids decoded
        with special tokens kept, or its text when a stop string may have cut it."""
        if self.tokenizer is None or stop_strings:
            return text
        return self.tokenizer.decode(ids)

    def reply_ids(self, ids: list[int]) -> list[int]:
        """A reply's ids as they extend the conversation's exact ids (none without a
        tokenizer)."""
        return list(ids) if self.tokenizer is not None else []


__all__ = ["ChatKeys", "load_router_tokenizer"]
