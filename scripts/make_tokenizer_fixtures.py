"""Make the tokenizer fixtures (tests/fixtures/tokenizers/): SentencePiece-style and Qwen2-style.

Not part of the test suite. The SentencePiece part needs sentencepiece, transformers, protobuf
and gguf, which the project does not depend on (no torch), so run it once from a separate
virtual environment; the Qwen2 part needs only tokenizers and gguf (the project's own .venv):

    python3 -m venv /tmp/tokvenv
    /tmp/tokvenv/bin/pip install transformers sentencepiece tokenizers protobuf gguf numpy
    HF_HUB_OFFLINE=1 /tmp/tokvenv/bin/python scripts/make_tokenizer_fixtures.py [sentencepiece|qwen2]
    .venv/bin/python scripts/make_tokenizer_fixtures.py qwen2

(no argument: both parts). The SentencePiece part trains a tiny SentencePiece BPE model the way Llama's was configured (byte fallback, split
digits, identity normalization, a dummy prefix, whitespace kept) on the built-in text below,
and writes:

  llama2/    tokenizer.json in the format of the Llama 2 / Mistral v0.1 repositories (the
             legacy converter: a Prepend('▁') + Replace(' ', '▁') normalizer, byte-fallback
             BPE, merges ranked by piece score), tokenizer_config.json with Llama 2's template
  mistral/   the same vocabulary as transformers 5 writes it (LlamaTokenizer, legacy=False: a
             Metaspace pre-tokenizer that prepends '▁' to the first piece only) plus the
             control tokens [INST] and [/INST], with a Mistral-style template
  llama2.gguf  a GGUF file with only the tokenizer metadata llama.cpp writes for the llama2
             vocabulary (tokens, scores, token types, special ids, add_bos/eos, template)
  reference.json  the hard strings and their ids: from SentencePiece itself (the original
             implementation) and from transformers on each tokenizer.json; chat renderings and
             ids from transformers' apply_chat_template; template feature renderings

The Qwen2 part (make_qwen2, below) writes qwen2/, qwen2.gguf and qwen2_reference.json.

The GGUF reference is the llama2 ids: llama.cpp (whose files these are) prepends a space to the
text and after every control token, as the legacy tokenizer.json and SentencePiece do.
transformers 5 (its GGUF loader needs torch, so it is not run here) builds a GGUF SentencePiece
vocabulary as its non-legacy LlamaTokenizer instead, i.e. like the mistral ids without the
[INST] tokens: it differs on text that starts with a space and right after a control token.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import unicodedata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models,  # noqa: E402
                        normalizers, pre_tokenizers, processors, trainers)

try:   # the SentencePiece part only
    import sentencepiece as spm
    import transformers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges
except ImportError:
    spm = transformers = None

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizers"
VOCAB_SIZE = 480

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A conversation is a sequence of turns, and each
turn adds a message from the user and a reply from the assistant. The server keeps the key and
value cache of every conversation, so the next turn only computes the new tokens.
Hello world! Hello there, how are you today? I am fine, thank you. What is the weather like?
It is sunny and warm, with a light breeze from the west. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 2024.
def tokenize(text):
    return [piece for piece in text.split()]
for i in range(10):
    print(i, i * i)
Café, naïve, résumé, Zürich, façade, jalapeño, São Paulo, Kraków, Ångström.
日本語のテキストと中文的句子。
The model reads tokens, not characters: the tokenizer splits words into pieces, and pieces it
has never seen fall back to bytes. Spaces become a special mark, and a space is added in front
of the text. Tabs	and newlines
stay as they are.
"""

TEXTS = [
    "Hello world", "hello  world   with   spaces", " leading space", "  two leading spaces",
    "trailing space ", "trailing spaces   ", "line one\nline two\n\nline four\n",
    "tab\tseparated\tvalues", "mixed \t\n whitespace \n\t", "digits 1234567890 and 3.14159",
    "unicode: café naïve Zürich ß∑≈ç√", "combining: e\u0301 and zero\u200bwidth",
    "CJK: 日本語のテキスト 中文的句子", "emoji: 🙂🚀👍🏽 family 👨\u200d👩\u200d👧", "RTL: עברית العربية",
    "code: def f(x):\n    return x**2  # comment", "", " ", "\n", "a", "    ",
    "special tokens as text: <s> and </s> and <unk>", "<s>starts with bos", "ends with eos</s>",
    "[INST] inst tags [/INST]", "<s>[INST] Hi [/INST] Hello</s>", "<0x41> byte token text",
    "▁ a literal metaspace",
]
# decode(encode(t)) == t does not hold for these: a literal '▁' reads as a space, and <unk> is
# a token (a SentencePiece encoding of the characters would round-trip)
NO_ROUND_TRIP = {"▁ a literal metaspace"}

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}")
CHATS = [
    [{"role": "user", "content": "Hello there, how are you?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "  And   the  weather?\n"}],
    [{"role": "user", "content": "Café 日本 🙂"}, {"role": "assistant", "content": "Merci!"},
     {"role": "user", "content": "tabs\tand\nnewlines"}],
]

# Jinja features of transformers' chat templates: loop controls, tojson's arguments, tools,
# {% generation %}, namespace; rendered by transformers as the reference
FEATURE_TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}"
    "{%- if tools %}TOOLS {{ tools | tojson(indent=2, sort_keys=true) }}\n"
    "{{ tools[0] | tojson(separators=(',', ':')) }}\n{% endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' %}{% continue %}{% endif -%}"
    "{%- if m['content'] == 'STOP' %}{% break %}{% endif -%}"
    "{%- set ns.n = ns.n + 1 -%}"
    "{%- if m['role'] == 'assistant' %}{% generation %}<{{ ns.n }}:{{ m['content'] | tojson }}>"
    "{% endgeneration %}{% else %}[{{ ns.n }}:{{ m['content'] }}]{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ bos_token }}>{% endif -%}")
FEATURE_CASES = [
    {"messages": [{"role": "system", "content": "skipped"}, {"role": "user", "content": "héllo"},
                  {"role": "assistant", "content": "a \"quoted\" 日本 reply"},
                  {"role": "user", "content": "STOP"}, {"role": "user", "content": "never"}],
     "kwargs": {"tools": [{"name": "get_weather", "description": "Wetter für eine Stadt",
                           "parameters": {"city": {"type": "string"}, "b": 1}}]}},
    {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}],
     "kwargs": {}},
]


def train(workdir: Path) -> Path:
    (workdir / "train.txt").write_text(TRAINING_TEXT * 4)
    spm.SentencePieceTrainer.train(
        input=str(workdir / "train.txt"), model_prefix=str(workdir / "tokenizer"),
        vocab_size=VOCAB_SIZE, model_type="bpe", byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return workdir / "tokenizer.model"


def legacy_tokenizer_json(sp: spm.SentencePieceProcessor) -> Tokenizer:
    """The Llama 2 tokenizer.json format (transformers 4's legacy LlamaConverter)."""
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    merges = generate_merges(vocab, {p: s for p, s in pieces})
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def write_gguf(path: Path, sp: spm.SentencePieceProcessor) -> None:
    """The tokenizer metadata llama.cpp's convert_hf_to_gguf.py writes for this vocabulary."""
    types = []
    for i in range(sp.get_piece_size()):
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL
                     if sp.is_control(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                     else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.NORMAL)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tokenizer fixture")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(LLAMA2_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def decoded(tok, text: str) -> str:
    return tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False,
                      clean_up_tokenization_spaces=False)


def chat_reference(tok, template: str) -> list[dict]:
    out = []
    for messages in CHATS:
        if template == LLAMA2_TEMPLATE or messages[0]["role"] != "system":
            text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
            ids = tok.apply_chat_template(messages, chat_template=template, tokenize=True,
                                          add_generation_prompt=True, return_dict=False)
            assert ids == tok.encode(text, add_special_tokens=False)
            out.append({"messages": messages, "text": text, "ids": ids})
    return out


def make_sentencepiece() -> None:
    if spm is None or transformers is None:
        raise SystemExit("the SentencePiece fixtures need sentencepiece and transformers "
                         "(see the module docstring)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sp = spm.SentencePieceProcessor(model_file=str(train(work)))
        assert sp.get_piece_size() == VOCAB_SIZE
        for old in (OUT / "llama2", OUT / "mistral"):
            if old.exists():
                shutil.rmtree(old)
        (OUT / "llama2").mkdir(parents=True)
        legacy_tokenizer_json(sp).save(str(OUT / "llama2" / "tokenizer.json"))
        (OUT / "llama2" / "tokenizer_config.json").write_text(json.dumps({
            "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "legacy": True, "chat_template": LLAMA2_TEMPLATE}, indent=1))
        llama2 = PreTrainedTokenizerFast(tokenizer_file=str(OUT / "llama2" / "tokenizer.json"),
                                         bos_token="<s>", eos_token="</s>", unk_token="<unk>")

        spdir = work / "spm"
        spdir.mkdir()
        shutil.copy(work / "tokenizer.model", spdir / "tokenizer.model")
        mistral = LlamaTokenizer.from_pretrained(str(spdir), legacy=False, add_bos_token=True)
        mistral.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
        mistral.chat_template = MISTRAL_TEMPLATE
        mistral.save_pretrained(str(work / "mistral"))
        (OUT / "mistral").mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(work / "mistral" / name, OUT / "mistral" / name)
        mistral = LlamaTokenizer.from_pretrained(str(OUT / "mistral"))

        write_gguf(OUT / "llama2.gguf", sp)
        specials = ("<s>", "</s>", "<unk>", "[INST]", "[/INST]")
        plain = [i for i, t in enumerate(TEXTS) if not any(s in t for s in specials)]
        sp_ids = [sp.encode(t) for t in TEXTS]
        llama2_ids = [llama2.encode(t, add_special_tokens=False) for t in TEXTS]
        for i in plain:   # the legacy tokenizer.json is SentencePiece on text without specials
            assert llama2_ids[i] == sp_ids[i], (TEXTS[i], llama2_ids[i], sp_ids[i])
        features = []
        for case in FEATURE_CASES:
            text = llama2.apply_chat_template(case["messages"], chat_template=FEATURE_TEMPLATE,
                                              tokenize=False, add_generation_prompt=True,
                                              **case["kwargs"])
            features.append({**case, "text": text})
        reference = {
            "generator": "scripts/make_tokenizer_fixtures.py",
            "versions": {"transformers": transformers.__version__, "sentencepiece": spm.__version__,
                         "gguf": getattr(gguf, "__version__", "?")},
            "texts": TEXTS, "no_round_trip": sorted(TEXTS.index(t) for t in NO_ROUND_TRIP),
            "plain_texts": plain,
            "sp_ids": sp_ids,
            "llama2_ids": llama2_ids,
            "llama2_ids_with_bos": [llama2.encode(t) for t in TEXTS],
            "mistral_ids": [mistral.encode(t, add_special_tokens=False) for t in TEXTS],
            "mistral_ids_with_bos": [mistral.encode(t) for t in TEXTS],
            "llama2_decoded": [decoded(llama2, t) for t in TEXTS],
            "mistral_decoded": [decoded(mistral, t) for t in TEXTS],
            "llama2_chats": chat_reference(llama2, LLAMA2_TEMPLATE),
            "mistral_chats": chat_reference(mistral, MISTRAL_TEMPLATE),
            "feature_template": FEATURE_TEMPLATE, "feature_cases": features,
        }
        (OUT / "reference.json").write_text(json.dumps(reference, ensure_ascii=False, indent=1))

# -- Qwen2-style byte-level BPE --------------------------------------------------------------
#
# A tiny vocabulary in the format of Qwen2/2.5/3's tokenizer.json (NFC, the Split regex below,
# ByteLevel without its own regex, byte-level BPE) and the same vocabulary as the GGUF metadata
# llama.cpp's convert_hf_to_gguf.py writes for it (tokenizer.ggml.pre = "qwen2"). The merges
# are learned with a split that lets up to three digits and a letter run with its combining
# marks merge, as Qwen's real vocabulary (cl100k-derived) has multi-digit tokens: Qwen's own
# single-digit split never produces them, so a GGUF reader that groups digits (Llama 3's split)
# or breaks words at combining marks (qwen2 vs qwen35) gives other ids, and the test sees it.

# transformers' Qwen2Tokenizer / Qwen3_5Tokenizer PRETOKENIZE_REGEX (Qwen's tokenizer.json)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}"
               r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s"
                r"\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TRAINING_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}{1,3}| ?"
                  r"[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_VOCAB_SIZE = 512          # the qwen2 family fixture's vocab_size (tests/fixtures/families)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]      # control tokens
QWEN_USER_DEFINED = ["<think>", "</think>"]                           # added, not special
QWEN_TRAINING_TEXT = TRAINING_TEXT + """\
In 2024 and 2025 we counted 123 apples, 456 pears and 789 plums; 1000 more in 2026.
Call 555 1234 or 555 9876. Version 3.14 replaced 2.71 on 12 05 2024 at 10 30.
I'VE said it: you're right, they'll come, she'd know, it's fine, we've won, I'm here.
नमस्ते दुनिया। हिन्दी में लिखा गया वाक्य। किताब और कहानी।
Ça va très bien, merci. Où est la gare? À bientôt!
$price = 42; if (x >= 10) { return "done"; } // 100% sure
"""
QWEN_TEXTS = [
    "12345 and 2026", "Numbers: 0 7 10 100 1000 99999 3.14159 1,234,567 and -42",
    "I'VE seen it, you're right, they'll go, she'd say, it's fine, WE'LL see, DON'T",
    "Hello world", "hello  world   with   spaces", " leading space", "  two leading spaces",
    "trailing spaces   ", "line one\nline two\n\nline four\n", "mixed \t\n whitespace \n\t",
    "\n\n\n", "   \n  \n", "tab\tseparated\tvalues", "unicode: café naïve Zürich ß∑≈ç√",
    "decomposed: cafe\u0301 and nai\u0308ve", "नमस्ते दुनिया, हिन्दी में", "CJK: 日本語のテキスト 中文的句子",
    "emoji: 🙂🚀👍🏽 family 👨\u200d👩\u200d👧", "RTL: עברית العربية",
    "code: def f(x):\n    return x**2  # comment", '$price = "42"; (parens) [x] {y} 100%',
    "special tokens as text: <|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|> in the middle <|endoftext|>", "<think>reasoning</think> the answer",
    "<|im_start|partial <think", "", " ", "a",
]
# NFC composes these, so decode(encode(t)) is the composed text
QWEN_NOT_NFC = {"decomposed: cafe\u0301 and nai\u0308ve"}
CHATML_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' "
    "}}{%- endif %}")


def qwen_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], split: str) -> Tokenizer:
    """A tokenizer.json as Qwen's repositories have it (transformers' Qwen2Tokenizer)."""
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_USER_DEFINED])
    return tok


def train_qwen2() -> Tokenizer:
    n_bpe = QWEN_VOCAB_SIZE - len(QWEN_SPECIALS) - len(QWEN_USER_DEFINED)
    learner = qwen_tokenizer({}, [], TRAINING_SPLIT)
    learner.train_from_iterator(
        [QWEN_TRAINING_TEXT] * 4,
        trainers.BpeTrainer(vocab_size=n_bpe, show_progress=False, special_tokens=[],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(learner.to_str())["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i < n_bpe}
    assert len(vocab) == n_bpe and sorted(vocab.values()) == list(range(n_bpe))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = qwen_tokenizer(vocab, merges, QWEN2_SPLIT)
    assert tok.get_vocab_size(with_added_tokens=True) == QWEN_VOCAB_SIZE
    assert any(t.isdigit() and len(t) > 1 for t in vocab), "no multi-digit tokens learned"
    return tok


def write_qwen2_gguf(path: Path, tok: Tokenizer) -> None:
    """What convert_hf_to_gguf.py (Qwen2Model._set_vocab_gpt2) writes: every id's token text,
    added tokens as CONTROL when special (or looking like <|...|>) else USER_DEFINED, the
    tokenizer.json merges as "a b", bos/pad = <|endoftext|> (Qwen's config.json), eos."""
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.id_to_token(i)
        tokens.append(text)
        types.append(gguf.TokenType.NORMAL if i not in added else gguf.TokenType.CONTROL
                     if added[i].special or (text.startswith("<|") and text.endswith("|>"))
                     else gguf.TokenType.USER_DEFINED)
    merges = json.loads(tok.to_str())["model"]["merges"]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("qwen2 tokenizer fixture")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.token_to_id("<|endoftext|>"))
    w.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    w.add_pad_token_id(tok.token_to_id("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def split_ids(tok: Tokenizer, split: str, texts: list[str]) -> list[list[int]]:
    """Ids of `texts` from `tok`'s vocabulary and merges with another split regex."""
    config = json.loads(tok.to_str())
    config["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": split}
    other = Tokenizer.from_str(json.dumps(config))
    return [other.encode(t, add_special_tokens=False).ids for t in texts]


def make_qwen2() -> None:
    tok = train_qwen2()
    (OUT / "qwen2").mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT / "qwen2" / "tokenizer.json"))
    (OUT / "qwen2" / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}, indent=1))
    write_qwen2_gguf(OUT / "qwen2.gguf", tok)
    tok = Tokenizer.from_file(str(OUT / "qwen2" / "tokenizer.json"))   # as the tests read it
    ids = [tok.encode(t, add_special_tokens=False).ids for t in QWEN_TEXTS]
    qwen35 = split_ids(tok, QWEN35_SPLIT, QWEN_TEXTS)
    llama3 = split_ids(tok, TRAINING_SPLIT.replace(r"[\p{L}\p{M}]", r"\p{L}").replace(
        r"\p{L}\p{M}\p{N}", r"\p{L}\p{N}"), QWEN_TEXTS)
    assert qwen35 != ids and llama3 != ids, "the fixture cannot tell the splits apart"
    for t, got in zip(QWEN_TEXTS, ids):
        back = tok.decode(got, skip_special_tokens=False)
        assert back == (unicodedata.normalize("NFC", t) if t in QWEN_NOT_NFC else t), (t, back)
    reference = {
        "generator": "scripts/make_tokenizer_fixtures.py (make_qwen2)",
        "versions": {"tokenizers": tokenizers.__version__,
                     "gguf": getattr(gguf, "__version__", "?")},
        "qwen2_split": QWEN2_SPLIT, "qwen35_split": QWEN35_SPLIT,
        "texts": QWEN_TEXTS, "not_nfc": sorted(QWEN_TEXTS.index(t) for t in QWEN_NOT_NFC),
        "qwen2_ids": ids, "qwen35_ids": qwen35,
    }
    (OUT / "qwen2_reference.json").write_text(json.dumps(reference, ensure_ascii=False,
                                                         indent=None))


def main(parts: list[str]) -> None:
    known = {"sentencepiece": make_sentencepiece, "qwen2": make_qwen2}
    for part in parts or list(known):
        if part not in known:
            raise SystemExit(f"unknown part {part!r} (known: {', '.join(known)})")
        known[part]()
    print(f"wrote {OUT}: " + ", ".join(f"{p.relative_to(OUT)} {p.stat().st_size} B"
                                       for p in sorted(OUT.rglob("*")) if p.is_file()))


if __name__ == "__main__":
    main(sys.argv[1:])
