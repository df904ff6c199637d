"""The prefill budget: whole prompts with nothing decoding; beside decoding rows, steps near TARGET
times a decoding step on synthetic step times, fewer tokens when they are slower, the cap, prompts
always progressing; and the engine with a budget, on a clock the test drives."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import picogpt
from picogpt import budget
from picogpt import model as reference
from picogpt.budget import IDLE, LEAST, MOST, PROBE, TARGET, Budget
from picogpt.engine import Engine
from picogpt.kernels import forward
from picogpt.options import SERVE


def step_time(fixed=0.040, per_row=0.004, per_token=0.0024):
    """A step's seconds: gpt2 float32's shape on a 2-core host (the weights' read, each decoding row
    with its keys and values, each prompt token), four times as slow, so that TARGET times a decoding
    step is over FLOOR and TARGET decides."""
    return lambda decoding, prompt: fixed + per_row * decoding + per_token * prompt


def drive(b, seconds, rows, waiting=10**9):
    """Steps with rows[i] decoding rows and as many prompt tokens as `b` allows (from `waiting` in
    all), each taking seconds(decoding, prompt): [(decoding, prompt tokens)]."""
    steps = []
    for n in rows:
        prompt = min(b.tokens(n), waiting)
        waiting -= prompt
        b.took(n, prompt, seconds(n, prompt))
        steps.append((n, prompt))
    return steps


def test_with_nothing_decoding_a_step_takes_whole_prompts_up_to_the_cap():
    b = Budget()
    assert b.tokens(0) == IDLE >= 1024  # GPT-2's context: any prompt in one step
    drive(b, step_time(per_token=1.0), [8] * 50)  # prompt tokens beside decoding rows were very slow:
    assert b.tokens(0) == IDLE and b.beside(8) == LEAST  # no matter with nothing decoding
    assert Budget(cap=40).tokens(0) == 40


def test_beside_decoding_rows_a_step_takes_about_target_times_a_decoding_step():
    seconds = step_time()
    rows = np.random.default_rng(0).integers(1, 13, 600)  # 1 to 12 rows: every answer below MOST
    steps = drive(Budget(), seconds, rows)  # prompts always waiting: the steps hold what the budget allows
    ratios = [seconds(n, p) / seconds(n, 0) for n, p in steps[200:] if LEAST < p < MOST]
    assert len(ratios) > 300
    assert TARGET - 0.3 <= min(ratios) <= max(ratios) <= TARGET + 0.1, (min(ratios), max(ratios))
    # a step with no prompt tokens after PROBE with them, so that the fit sees what the rows cost alone
    runs = "".join("p" if p else "." for _, p in steps).split(".")
    assert max(map(len, runs)) == PROBE and len(runs) - 1 == len(steps) // (PROBE + 1)


def test_slower_prompt_tokens_get_fewer_and_it_follows_a_change():
    rows = [8] * 300
    fast, slow = Budget(), Budget()
    drive(fast, step_time(per_token=0.0006), rows)
    drive(slow, step_time(per_token=0.0048), rows)
    # (TARGET - 1) * 72 ms / 0.6 ms: above MOST; / 4.8 ms: 22
    assert fast.beside(8) == MOST and slow.beside(8) == 22
    drive(fast, step_time(per_token=0.0048), rows[:200])  # prompt tokens become 8x slower: the fit follows
    assert fast.beside(8) - slow.beside(8) in (0, 1)


def test_the_cap_bounds_every_step_and_least_lets_prompts_progress():
    b = Budget(cap=8)
    steps = drive(b, step_time(per_token=0.00001), [4] * 100)  # very cheap prompt tokens
    assert {p for _, p in steps} == {0, 8} and b.tokens(0) == 8
    b = Budget()
    drive(b, step_time(per_token=0.4), [4] * 100)  # prompt tokens 100x a decoding row
    assert b.beside(4) == LEAST


def test_most_keeps_a_step_on_the_one_row_a_token_path():
    # beside as many decoding rows (serve's default --parallel is 8), a step's tokens stay within
    # ROWS_MAX of every format: the compiled path, each token a row at its own position
    assert MOST + max(MOST, SERVE["parallel"]) <= min(forward.ROWS_MAX.values())
    for rows_max in [*forward.ROWS_MAX.values(), float("inf")]:  # the float formats', and int8's
        most = budget.most_for(rows_max)
        assert MOST <= most <= 4 * MOST and most + max(most, SERVE["parallel"]) <= rows_max


def test_short_decoding_steps_take_prompt_tokens_up_to_the_floor():
    """int8's case: a decoding step so short that TARGET times it leaves room for few prompt tokens;
    the step may then last FLOOR seconds (up to `most` tokens)."""
    seconds = step_time(fixed=0.002, per_row=0.0005, per_token=0.0005)  # 8 rows alone: 6 ms
    b = Budget(most=512)
    drive(b, seconds, [8] * 300)
    assert abs(b.beside(8) - (budget.FLOOR - 0.006) / 0.0005) <= 2  # 148: a step of FLOOR
    assert TARGET * seconds(8, 0) < budget.FLOOR
    drive(b, step_time(fixed=0.002, per_row=0.0005, per_token=0.00005), [8] * 300)  # cheaper tokens
    assert b.beside(8) == 512 and Budget(most=512).tokens(8) < 512  # `most` bounds it; the prior, before any step


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 300), st.integers(0, 1100), st.floats(1e-5, 5.0)),
        max_size=80,
    ),
    st.one_of(st.none(), st.integers(1, 256)),
    st.integers(1, 300),
)
def test_any_step_times_keep_the_answer_within_least_and_the_cap(steps, cap, decoding):
    b = Budget(cap=cap)
    for n, prompt, seconds in steps:
        b.took(n, prompt, seconds)
    assert b.tokens(0) == (cap or IDLE)
    least, most = min(LEAST, cap or LEAST), min(MOST, cap or MOST)
    n = b.tokens(decoding)
    if n == 0:  # the step that measures the rows alone; the next one has prompt tokens again
        assert b.prompted >= PROBE
        b.took(decoding, 0, 0.01)
        n = b.tokens(decoding)
    assert least <= n <= most


def test_a_step_that_fails_is_not_measured():
    b = Budget(clock=iter([0.0, 5.0]).__next__)
    with pytest.raises(RuntimeError), b.step(4, 10):
        raise RuntimeError("a forward pass that fails")
    assert not b.xx.any() and b.prompted == 0


# ---- the engine with a budget --------------------------------------------------------------------


@pytest.fixture(scope="module")
def m(tiny):
    return picogpt.load(tiny[0])


class Timed:
    """forward_rows that moves a clock on by each step's synthetic time (a sequence bringing one token
    is decoding: the prompts here come in larger pieces) and logs each step's tokens per sequence."""

    def __init__(self, forward_rows, seconds):
        self.forward_rows, self.seconds, self.now, self.log = forward_rows, seconds, 0.0, []

    def clock(self):
        return self.now

    def __call__(self, inputs, **kwargs):
        lengths = [len(ids) for ids in inputs]
        decoding = lengths.count(1)
        self.now += self.seconds(decoding, sum(lengths) - decoding)
        self.log.append(lengths)
        return self.forward_rows(inputs, **kwargs)


def test_the_engine_prefills_a_lone_prompt_at_once_and_bounds_the_steps_beside_decoding(m):
    seconds = step_time(per_token=0.004)  # prompt tokens this slow get LEAST a step: the pieces show
    timed = Timed(m.forward_rows, seconds)
    b, measured = Budget(clock=timed.clock), []
    took = b.took
    b.took = lambda n, prompt, s: measured.append((n, prompt, s)) or took(n, prompt, s)
    engine = Engine(timed, m.params, m.config, n_rows=3, budget=b)
    rng, seen = np.random.default_rng(3), {}

    def greedy(name):
        def pick(logits):
            seen.setdefault(name, []).append(logits.copy())
            return int(np.argmax(logits))

        return pick

    prompts = {
        "lone": [int(t) for t in rng.integers(0, 50257, 50)],
        "next": [int(t) for t in rng.integers(0, 50257, 40)],
    }
    lone = engine.add(prompts["lone"], 12, greedy("lone"))
    assert len(engine.step()) == 1 and timed.log == [[50]]  # nothing decoding: the whole prompt in one step
    following = engine.add(prompts["next"], 4, greedy("next"))
    got = [len(engine.step()) for _ in range(20) if engine.busy]
    assert not engine.busy and lone.new_tokens == 12 and following.new_tokens == 4
    # the lone sequence got a token every step while the next prompt went in pieces of LEAST
    assert timed.log[1:4] == [[1, 16], [1, 16], [1, 8]] and got[:3] == [1, 1, 2]
    # the budget was told each step with decoding rows: its rows, its prompt tokens, its time on the clock
    # (the one without decoding rows, a whole prompt, is not fitted: those go through BLAS)
    assert [(n, p) for n, p, _ in measured][:5] == [(0, 50), (1, 16), (1, 16), (1, 8), (2, 0)]
    assert all(s == pytest.approx(seconds(n, p)) for n, p, s in measured)
    # and each logit is the model's over the context, however the prompt was split
    for name, prompt in prompts.items():
        context = list(prompt)
        for logits in seen[name]:
            np.testing.assert_allclose(logits, full(m, context)[-1], atol=1e-4)
            context.append(int(np.argmax(logits)))


def full(m, ids):
    return reference.gpt2(ids, **m.params, n_head=m.config["n_head"])


def test_the_engine_takes_a_chunk_or_a_budget_not_both(m):
    with pytest.raises(ValueError, match="not both"):
        Engine(m.forward_rows, m.params, m.config, n_rows=1, chunk=8, budget=Budget())
    assert budget.Budget(cap=8).cap == 8
