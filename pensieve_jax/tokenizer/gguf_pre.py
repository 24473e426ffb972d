"""The text split a byte-level BPE vocabulary needs before its merges, by the name a GGUF file
gives it (`tokenizer.ggml.pre`): the file stores the name, and llama.cpp compiles in the regex
(llama.cpp's src/llama-vocab.cpp, `llm_tokenizer_bpe`; the Hugging Face tokenizer classes hold
the same regexes).

    gpt2, default, gpt-2     GPT-2's own split (ByteLevel with its regex)
    smollm, starcoder, ...   every digit on its own, then GPT-2's split
    llama-bpe, llama3, ...   Llama 3's regex: up to three digits together, case-insensitive
                             contractions, a letter run takes one leading non-letter
    qwen2, qwen35            Llama 3's regex with single digits (`\\p{N}`); qwen35 (Qwen3.5) also
                             keeps combining marks (`\\p{M}`) inside letter runs

qwen2 and qwen35 add NFC normalization: Qwen's own tokenizer (tokenizer.json, transformers'
Qwen2Tokenizer and Qwen3_5Tokenizer) composes the text before splitting it, so a file converted
from it gives the model the same ids as the checkpoint's tokenizer, also on decomposed text
("e" + U+0301). llama.cpp and transformers' GGUF loader skip that step; the ids differ only on
text that is not already NFC.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, normalizers, pre_tokenizers

from pensieve_jax.tokenizer.errors import TokenizerError

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
           r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}"
           r"\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class ByteLevelSplit:
    """How a byte-level vocabulary splits text before BPE.

    pattern: the regex whose matches are the pieces (None: GPT-2's, applied by ByteLevel).
    digits_first: every digit is cut out on its own before `pattern` runs.
    ignore_merges: a piece that is a whole token is taken as that token, merges or not
        (llama.cpp's `ignore_merges`; Llama 3's tokenizer.json sets it).
    nfc: NFC-normalize the text first (the model's own tokenizer does).
    """

    pattern: str | None = None
    digits_first: bool = False
    ignore_merges: bool = False
    nfc: bool = False

    def pre_tokenizer(self):
        if self.pattern is None:
            gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            if not self.digits_first:
                return gpt2
            return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    def normalizer(self):
        return normalizers.NFC() if self.nfc else None


_GPT2 = ByteLevelSplit()
_DIGITS_THEN_GPT2 = ByteLevelSplit(digits_first=True)
_LLAMA3_SPLIT = ByteLevelSplit(_LLAMA3, ignore_merges=True)

SPLITS: dict[str, ByteLevelSplit] = {
    "gpt2": _GPT2, "default": _GPT2, "gpt-2": _GPT2,
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama-bpe", "llama3", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "qwen2": ByteLevelSplit(_QWEN2, nfc=True),
    "qwen35": ByteLevelSplit(_QWEN35, nfc=True),
}


def byte_level_split(pre: str) -> ByteLevelSplit:
    """The split `tokenizer.ggml.pre` names, or a TokenizerError listing the supported names."""
    if pre not in SPLITS:
        raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre; "
                             f"supported: {', '.join(SPLITS)}); use a Hugging Face directory "
                             "with tokenizer.json instead")
    return SPLITS[pre]
