"""Make the model-family reference fixtures: tiny random checkpoints and what transformers does
with them (tests/fixtures/families/<name>/, read by tests/model/test_families.py).

NOT part of the test suite: it needs torch and transformers, which the project does not depend
on. Run it once from a separate virtual environment:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/refvenv/bin/python scripts/make_family_fixtures.py [--only NAME ...]

Per family it builds a tiny model with the family's real feature set (a few layers, hidden 64,
vocabulary 512), draws every weight at random (biases and norm scales included: transformers
initializes those to 0 and 1, which would test nothing), rounds the weights to bfloat16 and
saves the checkpoint as a Hugging Face directory (config.json + model.safetensors in bfloat16,
a byte-level tokenizer.json). Some configs are rewritten into the transformers 4 format (top
level rope_theta / rope_scaling, as most checkpoints on the hub are); the others keep the
transformers 5 format (rope_parameters). The directory is then loaded back with transformers in
float32 (eager attention) and, per prompt of fixed token ids, greedy generation runs with
output logits. reference.json keeps the prompts, the greedy ids, the full logits at the first
and last generated steps, the top-1 / top-2 margins (a greedy comparison is only meaningful
where no step is a near tie: seeds are redrawn until every margin is above MIN_MARGIN and no
continuation is a loop of a few tokens) and what the config means
(`expect`: written here by hand, what our loader must read from it).

Dynamic RoPE note: transformers recomputes the frequencies from the longest position of each
forward call, so tokens generated one at a time each get their own; prompts here stay within
max_position_embeddings (where the rotation is the unscaled one) and generation runs past it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "families"
VOCAB = 512
MIN_MARGIN = 2e-3
MIN_DISTINCT = 1 / 3     # of a greedy continuation's tokens, at least this share distinct
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, hidden_act="silu",
            bos_token_id=None, eos_token_id=None, pad_token_id=None)

# What every family has unless its entry says otherwise: the model's config (on top of BASE), and
# `expect`, what our loader must read from that config (written by hand, per family).
CONFIG = dict(num_hidden_layers=2, tie_word_embeddings=False, max_position_embeddings=4096)
EXPECT = dict(qkv_bias=False, o_bias=False, qk_norm=False, sliding_window=None,
              tie_word_embeddings=False, rope_kind=None, rope_theta=10000.0)


def family(cls: str, prompts: list[int], *, config: dict, expect: dict, new_tokens: int = 16,
           legacy: bool = False, **more) -> dict:
    """One family's entry: CONFIG and EXPECT with its overrides. legacy: its config.json in the
    transformers 4 format; prompts: the prompt lengths; more: legacy_extra."""
    return dict(cls=cls, legacy=legacy, config={**CONFIG, **config}, prompts=prompts,
                new_tokens=new_tokens, expect={**EXPECT, **expect}, **more)


FAMILIES = {
    "qwen2": family(
        "Qwen2ForCausalLM", [12, 30], legacy=True,
        config=dict(tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False,
                    max_window_layers=2),
        legacy_extra={"sliding_window": 4096},       # present but off, as in Qwen2.5 configs
        expect=dict(qkv_bias=True, tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": family(
        "Qwen3ForCausalLM", [14, 5], legacy=True,
        config=dict(num_hidden_layers=3, rope_theta=1000000.0,
                    rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                  "original_max_position_embeddings": 1024}),
        expect=dict(qk_norm=True, rope_kind="yarn", rope_theta=1000000.0)),
    "mistral": family(
        "MistralForCausalLM", [40, 9], new_tokens=24,
        config=dict(num_hidden_layers=3, sliding_window=16, rope_theta=10000.0),
        expect=dict(sliding_window=16)),
    "llama-yarn": family(
        "LlamaForCausalLM", [20, 6], new_tokens=20,
        config=dict(max_position_embeddings=64,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 16,
                                     "beta_fast": 16.0}),
        expect=dict(rope_kind="yarn", rope_theta=50000.0)),
    "llama-dynamic": family(
        "LlamaForCausalLM", [20, 7], new_tokens=24,
        config=dict(max_position_embeddings=32, attention_bias=True,
                    rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                     "factor": 2.0}),
        expect=dict(qkv_bias=True, o_bias=True, rope_kind="dynamic")),
}


def byte_level_tokenizer() -> Tokenizer:
    """One token per byte, three ChatML specials and reserved fillers up to VOCAB (the layout
    of pensieve_jax.tokenizer.Tokenizer.byte_level)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    first = len(vocab)
    vocab.update({t: first + i for i, t in enumerate(specials)})
    vocab.update({f"<|reserved_{i}|>": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def randomize(model: torch.nn.Module, seed: int, tied: bool) -> None:
    """Every parameter drawn at random, then rounded to bfloat16 (what is stored). Tied
    embeddings are drawn small: a large one dominates the residual stream and the head then
    predicts the input token again and again."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                value = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
            elif name.endswith(".bias"):
                value = 0.3 * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name:
                value = (0.1 if tied else 1.0) * torch.randn(p.shape, generator=gen)
            elif "lm_head" in name:
                value = 2.0 / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=gen)
            else:                                    # [out, in]
                value = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1])
            p.copy_(value.to(torch.bfloat16).to(torch.float32))


def to_legacy(config: dict, extra: dict) -> dict:
    """transformers 5's rope_parameters -> top-level rope_theta / rope_scaling (transformers 4)."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters") or {})
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    config.pop("layer_types", None)
    config.update(extra)
    return config


def build(name: str, spec: dict, seed: int, directory: Path) -> None:
    cls = getattr(transformers, spec["cls"])
    config = cls.config_class(**{**BASE, **spec["config"]})
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed, bool(spec["config"].get("tie_word_embeddings")))
    if directory.exists():
        shutil.rmtree(directory)
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    saved["_name_or_path"] = f"fixture/{name}"
    if spec["legacy"]:
        saved = to_legacy(saved, spec.get("legacy_extra", {}))
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    (directory / "tokenizer.json").write_text(byte_level_tokenizer().to_str())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "add_bos_token": False}, indent=2) + "\n")
    for extra in ("generation_config.json",):
        (directory / extra).unlink(missing_ok=True)


def reference(directory: Path, spec: dict, seed: int) -> dict:
    """Greedy generation and logits with transformers, from the directory as saved, a fresh
    model per prompt (transformers' dynamic RoPE keeps state from one call to the next)."""
    rng = np.random.default_rng(seed)
    cases, worst = [], math.inf
    n = spec["new_tokens"]
    steps = [0, n - 1]            # logits kept at the first and the last generated step
    for length in spec["prompts"]:
        prompt = [int(t) for t in rng.integers(0, 259, length)]
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="eager").eval()
        model.generation_config.eos_token_id = None
        ids = torch.tensor([prompt])
        with torch.no_grad():      # the mask given: no id is taken for padding
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=VOCAB - 1)
        greedy = [int(t) for t in out.sequences[0, length:]]
        logits = torch.stack([l[0] for l in out.logits]).float().numpy()   # [n, vocab]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        margins = top2[:, 1] - top2[:, 0]
        assert len(greedy) == n and list(logits.argmax(-1)) == greedy
        worst = min(worst, float(margins.min()))
        if len(set(greedy)) < MIN_DISTINCT * n:
            worst = -1.0                       # a loop of one token tests little: redraw
        cases.append({"prompt_ids": prompt, "greedy_ids": greedy,
                      "min_margin": float(margins.min()),
                      "logit_steps": steps,
                      "logits": [[float(f"{x:.7g}") for x in logits[s]] for s in steps]})
    return {"cases": cases, "min_margin": worst, "resolved_config": {
        k: getattr(model.config, k, None) for k in ("rope_parameters", "sliding_window",
                                                      "layer_types", "tie_word_embeddings")}}


def make(name: str) -> None:
    spec = FAMILIES[name]
    directory = OUT / name
    for seed in range(100):
        build(name, spec, seed, directory)
        ref = reference(directory, spec, seed)
        if ref["min_margin"] > MIN_MARGIN:
            break
        print(f"{name}: seed {seed} has a near tie ({ref['min_margin']:.2e}) or a greedy "
              "loop; next seed")
    else:
        raise SystemExit(f"{name}: no seed without near ties")
    ref.update(family=name, architecture=spec["cls"], seed=seed, expect=spec["expect"],
               rope_format="rope_theta/rope_scaling" if spec["legacy"] else "rope_parameters",
               torch=torch.__version__, transformers=transformers.__version__,
               dtype="float32 (weights stored as bfloat16)")
    (directory / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    size = sum(f.stat().st_size for f in directory.iterdir())
    print(f"{name}: seed {seed}, min margin {ref['min_margin']:.3g}, {size / 1024:.0f} KiB")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.only:
        make(name)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
