"""Tokenizers and chat templates, built from GGUF metadata or a Hugging Face `tokenizer.json`.

    tok.encode_chat(messages)                      # the chat template's token ids; message
                                                   # content is plain text (no control tokens)
    tok.encode_chat(messages, prefix_ids=ids)      # ...continuing a conversation's exact ids

Modules: tokenizer (the Tokenizer), chat_template (Jinja rendering as transformers does it, and
which text came from the messages), segments (plain spans, continuation), gguf_vocab
(byte-level BPE and SentencePiece vocabularies from GGUF metadata), hf_files (a Hugging Face
directory's tokenizer files), text_stream (incremental decoding).
"""

from pensieve_jax.tokenizer.chat_template import ChatTemplate, RenderedChat
from pensieve_jax.tokenizer.errors import TokenizerError
from pensieve_jax.tokenizer.text_stream import TextStream
from pensieve_jax.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "RenderedChat", "TextStream", "Tokenizer", "TokenizerError"]
