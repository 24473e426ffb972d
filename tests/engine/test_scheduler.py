"""Scheduler and conversation store without a model: budgets, chunking, eviction, preemption."""

from pensieve_jax.kvcache.pages import PageAllocator
from pensieve_jax.kvcache.conversations import ConversationStore
from pensieve_jax.engine.request import Request, RequestHandle
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.engine.scheduler import Scheduler, SchedulerConfig

PS = 4


def setup(num_pages=16, tokens=8, seqs=4):
    store = ConversationStore(PageAllocator(num_pages), PS)
    return Scheduler(SchedulerConfig(tokens, seqs), store), store


def req(prompt_len, conv=None, start=0):
    prompt = list(range(start, start + prompt_len))
    return Request(f"r{start}", prompt, SamplingParams(max_tokens=4), 0, conv,
                   RequestHandle("h", conv))


def run_step(sched, sampled=7):
    """Pretend the model ran: advance computed counts, append a token to sampled rows."""
    rows = sched.schedule()
    for r in rows:
        r.request.conversation.num_computed = r.end
        if r.sample:
            r.request.output.append(sampled)
            r.request.token_ids.append(sampled)
    return rows


def test_chunked_prefill_under_the_token_budget():
    sched, _ = setup(tokens=8)
    a = req(20)
    sched.add(a)
    chunks = [[(r.start, r.end, r.sample) for r in run_step(sched)] for _ in range(3)]
    assert chunks == [[(0, 8, False)], [(8, 16, False)], [(16, 20, True)]]


def test_decodes_go_first_and_prefills_share_the_rest():
    sched, _ = setup(tokens=8)
    a, b = req(3, start=0), req(30, start=100)
    sched.add(a)
    run_step(sched)                  # a prefilled, sampled
    sched.add(b)
    rows = run_step(sched)
    assert [(r.request, r.end - r.start) for r in rows] == [(a, 1), (b, 7)]


def test_sequence_budget():
    sched, _ = setup(tokens=64, seqs=2)
    for i in range(3):
        sched.add(req(2, start=10 * i))
    assert len(run_step(sched)) == 2 and len(sched.waiting) == 1


def test_idle_conversations_are_evicted_lru_before_preemption():
    sched, store = setup(num_pages=4, tokens=16)
    for i, name in enumerate(("old", "new")):
        r = req(7, conv=name, start=100 * i)         # 2 pages each
        sched.add(r)
        run_step(sched)
        sched.finish(r)
        store.release(r.conversation, keep_kv=True)
    assert store.allocator.num_free == 0
    sched.add(req(5, conv="third", start=500))       # needs 2 pages
    run_step(sched)
    old, new = store.conversations["old"], store.conversations["new"]
    assert old.pages == [-1, -1] and old.dropped == 2       # least recently used: dropped
    assert min(new.pages) >= 0 and new.dropped == 0
    assert sched.num_preemptions == 0


def test_newest_running_turn_is_preempted_and_everything_finishes():
    sched, store = setup(num_pages=6, tokens=32, seqs=4)
    reqs = [req(7, conv=f"c{i}", start=100 * i) for i in range(3)]   # 2 pages each at first
    for r in reqs:
        sched.add(r)
    finished = set()
    for _ in range(200):
        if not sched.has_work():
            break
        for r in run_step(sched):
            rq = r.request
            if r.sample and len(rq.output) >= 6 and rq not in finished:
                finished.add(rq)
                sched.finish(rq)
                store.release(rq.conversation, keep_kv=False)
    assert finished == set(reqs)
    assert sched.num_preemptions > 0
    assert store.allocator.num_free == 6


def test_a_busy_conversation_rejects_a_second_turn():
    sched, _ = setup()
    sched.add(req(3, conv="x"))
    run_step(sched)
    sched.add(req(3, conv="x"))
    run_step(sched)
    assert len(sched.rejected) == 1 and "turn in progress" in str(sched.rejected[0][1])


def test_edited_history_truncates_to_the_common_prefix():
    sched, store = setup()
    first = req(10, conv="e")
    sched.add(first)
    run_step(sched)
    sched.finish(first)
    store.release(first.conversation, keep_kv=True)
    edited = list(first.token_ids)
    edited[6] = 999
    second = Request("r2", edited + [1, 2], SamplingParams(max_tokens=2), 0, "e",
                     RequestHandle("h", "e"))
    sched.add(second)
    rows = run_step(sched)
    assert second.cached == 6 and rows[0].start == 6
    assert len(store.conversations["e"].pages) == -(-rows[0].end // PS)


def test_a_mixed_step_ends_its_last_prefill_chunk_at_a_program_boundary():
    """With decodes in the step, a last prefill chunk that would pad the step up to the next
    program is cut at the one below (the rest runs next step); a prefill alone never is."""
    from pensieve_jax.engine.batching import Row, fit_to_program
    ladder = (8, 16, 32, 48, 64, 96, 128)
    decodes = [Row(object(), 10 + i, 11 + i, True) for i in range(30)]
    prefill = Row(object(), 0, 40, True)
    rows = fit_to_program(decodes + [prefill], ladder)           # 70 tokens: 96 -> 64
    assert rows[:30] == decodes and rows[30].end == 34 and not rows[30].sample
    assert sum(r.end - r.start for r in rows) == 64
    assert fit_to_program([prefill], ladder) == [prefill]         # alone: no extra step
    near = decodes + [Row(object(), 0, 60, True)]                 # 90 tokens: 6 of padding
    assert fit_to_program(near, ladder) == near
    short = decodes[:20] + [Row(object(), 0, 3, True)]            # 23: the chunk is too short
    assert fit_to_program(short, ladder) == short
    assert fit_to_program(decodes + [prefill], ()) == \
        decodes + [prefill]                                       # no ladder, no cut
