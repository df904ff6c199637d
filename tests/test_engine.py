"""The engine (continuous batching) against the NumPy reference: every logit a sequence is given equals a
full forward pass over its context, whatever else is in the batch, however its prompt is chunked."""

import numpy as np
import pytest

import picogpt
from picogpt import model as reference
from picogpt.engine import Engine


@pytest.fixture(scope="module")
def m(tiny):
    return picogpt.load(tiny[0])


def recorder(forward_rows, log):
    def forward(inputs, **kwargs):
        log.append([len(ids) for ids in inputs])
        return forward_rows(inputs, **kwargs)

    return forward


def checking_picker(m, prompt, seen, greedy=True):
    """Pick greedily, and keep (context, logits) to check against the reference afterwards."""
    context = list(prompt)

    def pick(logits):
        seen.append((list(context), logits.copy()))
        token = int(np.argmax(logits))
        context.append(token)
        return token

    return pick


def full(m, ids):
    return reference.gpt2(ids, **m.params, n_head=m.config["n_head"])


def test_chunked_prefill_beside_decoding_equals_the_reference(m):
    rng = np.random.default_rng(0)
    log, seen = [], {}
    engine = Engine(recorder(m.forward_rows, log), m.params, m.config, n_rows=3, chunk=7)
    short = [int(t) for t in rng.integers(0, 50257, 3)]
    first = engine.add(short, 30, checking_picker(m, short, seen.setdefault("a", [])))
    assert [len(engine.step()) for _ in range(3)] == [1, 1, 1]
    long = [int(t) for t in rng.integers(0, 50257, 40)]
    second = engine.add(long, 10, checking_picker(m, long, seen.setdefault("b", [])))
    got = {first.id: 0, second.id: 0}
    for _ in range(60):
        if not engine.busy:
            break
        for seq, _ in engine.step():
            got[seq.id] += 1
    assert not engine.busy and got == {first.id: 27, second.id: 10}
    # the long prompt went in chunks of at most 7 while the short one kept decoding, one token a step
    assert all(sum(n for n in step if n > 1) <= 7 for step in log)
    assert sum(1 for step in log if len(step) == 2 and 1 in step and max(step) > 1) >= 5
    for name, picks in seen.items():
        for context, logits in picks:
            np.testing.assert_allclose(logits, full(m, context)[-1], atol=1e-4)


def test_same_prompt_prefills_once_and_gives_what_each_gets_alone(m):
    rng = np.random.default_rng(1)
    prompt = [int(t) for t in rng.integers(0, 50257, 20)]
    alone = []
    engine = Engine(m.forward_rows, m.params, m.config, n_rows=1)
    engine.add(prompt, 8, lambda logits: alone.append(int(np.argmax(logits))) or alone[-1])
    while engine.busy:
        engine.step()
    engine = Engine(m.forward_rows, m.params, m.config, n_rows=3, chunk=6)
    outs = [[] for _ in range(3)]
    for out in outs:
        engine.add(prompt, 8, lambda logits, out=out: out.append(int(np.argmax(logits))) or out[-1])
    for _ in range(50):
        if not engine.busy:
            break
        engine.step()
    assert outs == [alone] * 3
    assert engine.prompt_tokens == len(prompt) + 2  # the others copy the cache and feed only the last prompt token


def test_rows_are_reused_waiting_sequences_are_admitted_and_cancel_frees(m):
    engine = Engine(m.forward_rows, m.params, m.config, n_rows=2)
    greedy = lambda logits: int(np.argmax(logits))  # noqa: E731
    seqs = [engine.add([1, 2, 3 + i], 5, greedy) for i in range(4)]
    engine.step()
    assert [s.row is not None for s in seqs] == [True, True, False, False]
    engine.cancel(seqs[0])
    assert seqs[0].finish == "cancelled" and seqs[0].row is None
    engine.step()
    assert seqs[2].row is not None and seqs[3].row is None
    engine.cancel(seqs[3])  # still waiting: leaves the queue
    for _ in range(20):
        if not engine.busy:
            break
        engine.step()
    assert [s.finish for s in seqs] == ["cancelled", "length", "length", "cancelled"] and [
        s.new_tokens for s in seqs[1:3]
    ] == [5, 5]
    assert sorted(engine.free) == [0, 1]


def test_score_sees_every_prompt_logit_and_the_context_end_is_length(m):
    n_ctx = m.config["n_positions"]
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, 50257, n_ctx - 2)]
    scored = []
    engine = Engine(m.forward_rows, m.params, m.config, n_rows=1, chunk=9)
    seq = engine.add(
        prompt, 10, lambda logits: 7, score=lambda logits, targets: scored.append((logits.copy(), list(targets)))
    )
    for _ in range(20):
        if not engine.busy:
            break
        engine.step()
    logits = np.concatenate([lg for lg, _ in scored])
    assert sum((t for _, t in scored), []) == prompt[1:]
    np.testing.assert_allclose(logits, full(m, prompt)[:-1], atol=1e-4)
    assert seq.finish == "length" and seq.new_tokens == 3  # after positions n_ctx - 2 and n_ctx - 1, and the last pick
    with pytest.raises(ValueError, match="more than"):
        engine.add(list(range(n_ctx + 1)), 1, lambda logits: 0)


def test_short_prompts_go_first_but_never_starve_a_long_one(m):
    """Prompts are prefilled in order of when they are due (arrival in prompt tokens computed, plus their
    own): a short prompt that arrives with a long one gets its first token first; short prompts arriving
    faster than the steps take them (shortest-first would never run the long one) delay it only by the
    ones due before it, those that arrived before the engine had computed its own length."""
    rng = np.random.default_rng(3)
    greedy = lambda logits: int(np.argmax(logits))  # noqa: E731
    engine = Engine(m.forward_rows, m.params, m.config, n_rows=80, chunk=8)
    long = engine.add([int(t) for t in rng.integers(0, 50257, 40)], 2, greedy)
    short = engine.add([int(t) for t in rng.integers(0, 50257, 5)], 2, greedy)
    assert [seq for seq, _ in engine.step()] == [short] and long.new_tokens == 0
    shorts, done_at = [], None
    for _ in range(40):  # two 5-token prompts a step, 8 tokens a step computed
        shorts += [engine.add([int(t) for t in rng.integers(0, 50257, 5)], 1, greedy) for _ in range(2)]
        if long in [seq for seq, _ in engine.step()]:
            done_at = engine.prompt_tokens
            break
    assert done_at is not None and long.due == 40
    before = [s for s in shorts if s.due < long.due]
    assert all(s.new_tokens == 1 for s in before)  # all served before it
    assert done_at <= long.due + 5 * len(before) + 8  # and nothing else but a step's leftover
    assert any(s.new_tokens == 0 for s in shorts)  # the backlog grew: shortest-first would starve it
