"""Phase swap of benchmarks/gpu_check.py: host <-> device page copies of a preset's page shape
(bench_swap.measure) and how much of a swap-in's copy one step hides, both swap-in modes
(bench_swap_overlap.measure).
"""

from __future__ import annotations

from gpu_check_lib.results import Phase


def swap_settings(dry: bool) -> dict:
    if dry:
        return dict(preset="tiny", dtype="float32", pool_pages=16, batches=[4], repeats=1,
                    seqs=2, context=16, overlap_batches=[8])
    return dict(preset="llama3-8b", dtype="bfloat16", pool_pages=256, batches=[8, 32, 128],
                repeats=5, seqs=16, context=512, overlap_batches=[32, 128])


def overlap_runner(s: dict, attention: str):
    """A ModelRunner of the preset's shape with random weights, for bench_swap_overlap.measure
    (as its main builds it): the step programs that load pages layer by layer included."""
    import jax.numpy as jnp
    from bench_swap_overlap import step_input
    from pensieve_jax.model.config import PRESETS
    from pensieve_jax.runner.model_runner import ModelRunner
    from pensieve_jax.tokenizer import Tokenizer
    from pensieve_jax.weights import LoadedModel, random_params
    config, dtype = PRESETS[s["preset"]], jnp.dtype(s["dtype"])
    model = LoadedModel(config, random_params(config, dtype),
                        Tokenizer.byte_level(config.vocab_size), f"random:{s['preset']}")
    step = step_input(s["seqs"], s["context"], 1, 16, config.vocab_size)
    used = step.page_table.size
    runner = ModelRunner(model, used + max(s["overlap_batches"]), 16, attention, dtype,
                         max_num_seqs=s["seqs"], max_batched_tokens=len(step.token_ids),
                         max_model_len=s["context"] + 1, layered_loads=True)
    return runner, step, used


def phase_swap(ph: Phase) -> dict:
    import jax.numpy as jnp
    import bench_swap
    import bench_swap_overlap
    from pensieve_jax.model.config import PRESETS
    from pensieve_jax.model.self_check import resolve_attention
    s = swap_settings(ph.dry_run)
    c = PRESETS[s["preset"]]
    bw = bench_swap.measure(c.num_layers, 16, c.num_kv_heads, c.head_dim, jnp.dtype(s["dtype"]),
                            s["pool_pages"], s["batches"], s["repeats"])
    ph.result.update(settings=s, bandwidth=bw)
    ph.save()
    overlap = None
    if ph.has_time(5 if ph.dry_run else 40, "swap overlap"):
        attention = resolve_attention(None, ph.result["backend"])
        runner, step, used = overlap_runner(s, attention)
        rows = bench_swap_overlap.measure(runner, step, used, s["overlap_batches"], s["repeats"])
        overlap = {"attention": attention, "incoming_pages": runner.programs.incoming_pages,
                   "in_step_load_error": runner.in_step_load_error, "rows": rows}
    big = bw["batches"][-1]
    return {"settings": s, "bandwidth": bw, "overlap": overlap, "headline": {
        "pages": big["pages"], "h2d_GBps": big["h2d_GBps"], "d2h_GBps": big["d2h_GBps"],
        "h2d_pinned_GBps": big.get("h2d_pinned_GBps"),
        "hidden": overlap and {r["pages"]: {"layered": r["layered_hidden"],
                                            "next_step": r["next_step_hidden"]}
                               for r in overlap["rows"]}}}
