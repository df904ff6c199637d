"""The prefill budget: how many prompt tokens the engine's next step may take, from the steps it has timed.

A step reads every weight once and then does each row's work, so its time is about

    seconds = fixed + per_row * decoding rows + per_token * prompt tokens

(a decoding row costs more than a prompt token: it reads its row of keys and values from memory and
is sampled). With no sequence decoding, nobody waits on the step: it takes whole prompts, at full
speed. Beside decoding rows, the step takes prompt tokens until it would last TARGET times as long as
those rows alone, or FLOOR seconds where that is longer (but at least LEAST), so that the streams'
time between tokens stays within TARGET of a decoding step, or under FLOOR, while prompts prefill as
fast as that allows. vLLM's scheduler bounds a step's
tokens the same way, decoding first, with a number of tokens it is configured with; here the number
follows from the times measured, so it adapts to the model, the weight format, the machine and the
load.

The three coefficients are a least-squares fit of the steps with decoding rows, each weighing DECAY
times less one step later (so the fit follows a machine that slows down), leaning on a prior where
the steps measured do not tell them apart (none yet, or all of the same rows). Under a steady stream
of prompts every step would hold the tokens the fit allows, which follow from the decoding rows, and
then no fit can tell the prompt tokens' part from the rest: so after PROBE steps in a row with prompt
tokens, the next has none, and measures what the rows cost alone.

The engine asks `tokens` in its schedule and times its run and update with `step`.
"""

import contextlib
import time

import numpy as np

# A step with prompt tokens beside decoding rows takes about this many times as long as those rows
# alone: the p99 time between tokens stays within 2.5x a decoding step, so under 3x the median (a
# decoding step at least) with room for a shared machine's noise. A prompt beside decoding rows is
# then prefilled in TARGET / (TARGET - 1) = 1.67x the time of its tokens alone (2x at TARGET 2).
TARGET = 2.5
LEAST = 16  # prompt tokens a step takes beside decoding rows however slow they are: prompts always progress
# The most prompt tokens a step takes beside decoding rows: half of kernels.forward.ROWS_MAX (tested),
# so that with up to as many decoding rows the step runs as decoding does, each token a row of the
# compiled block (a longer step of a float format goes through BLAS prompt by prompt). The fit, not
# this, bounds a step in the usual case: 37 prompt tokens beside 16 decoding rows of gpt2 float32.
MOST = 128
# A step beside decoding rows may last this many seconds whatever TARGET says: int8's decoding step is
# short (31 ms at 8 clients of gpt2), so TARGET alone gave its prompts the fewest tokens of any format,
# and int8's median time to first token was 1.27x llama-server's at 8 clients and 2.6x at 16. With a
# floor of 80 ms (and int8's `most_for` 512: it never goes to BLAS) it was 0.86x and 1.37x; with 100
# ms, and prompts taken in order of when they are due (engine.py), 0.54x and 0.61x, float32 0.42x and
# 0.67x, the p99 between tokens 114 to 217 ms, goodput 25 to 92% against llama-server's 3 to 8%
# (bench_serve.py, AVX-512 host). 120 ms gave about the same first tokens and a p99 over 200 ms more often.
FLOOR = 0.1
IDLE = 1024  # with nothing decoding: GPT-2's context, so that any one prompt is prefilled in one step
# A step's weight in the fit, one step later: about the last 20 steps count. On simulated step times,
# when prompt tokens became 4x as slow the fit followed within 100 steps (a second or two) at 0.95,
# 300 at 0.98; the fit's noise, and so the steps' spread around TARGET, grew little.
DECAY = 0.95
PROBE = 16  # steps in a row with prompt tokens beside decoding rows, before one without (6% of their prefill)

# The prior, in units of one prompt token's time and scaled to the steps measured: the weights' read
# as 6 prompt tokens, a decoding row as 1. On gpt2 float32 (a 2-core host) a step of 4 decoding rows
# took 8 ms, 21 with 16 prompt tokens, 30 with 32, 46 with 64: 4 rows are 10 to 13 tokens' time where
# the prior says 10, so before the first measurements a step errs towards fewer tokens. It weighs as
# a tenth of three steps, one of each part alone (the fixed part, 8 rows, 32 prompt tokens), against
# about 20 measured ones: on simulated step times, a prior of a whole step each kept the steps at
# 1.7x instead of 2.5x a decoding step.
PRIOR = np.array([6.0, 1.0, 1.0])  # fixed, per decoding row, per prompt token
RIDGE = 0.1 * np.diag([1.0, 8.0, 32.0]) ** 2


def most_for(rows_max):
    """The most prompt tokens a step takes beside decoding rows, for weights whose steps run as rows up
    to `rows_max` tokens (kernels.forward.rows_max): half of it, so that with as many decoding rows a
    step stays on that path, and at most 4 * MOST (int8, rows at any length)."""
    return int(min(rows_max, 8 * MOST) // 2)


class Budget:
    """Answers how many prompt tokens the next step may take (`tokens`), learning from each step's time
    (`step`, or `took`). cap: the most prompt tokens any step takes (None: IDLE with nothing decoding,
    up to `most` beside decoding rows: most_for the weights). clock: seconds, for timing the steps (tests pass their own)."""

    def __init__(self, cap=None, most=MOST, clock=time.perf_counter):
        self.cap, self.most, self.clock = cap, most, clock
        # the weighted sums of the least-squares fit: x x^T and x * seconds, x = (1, decoding, prompt)
        self.xx, self.xy = np.zeros((3, 3)), np.zeros(3)
        self.prompted = 0  # steps in a row with decoding rows and prompt tokens

    def __repr__(self):
        return f"<picogpt.Budget: {self.tokens(8)} prompt tokens next beside 8 decoding rows; cap {self.cap}>"

    def tokens(self, decoding):
        """The most prompt tokens the next step may take beside `decoding` decoding rows: the cap or
        IDLE with none, 0 for a step that measures the rows alone, else `beside(decoding)`."""
        if not decoding:  # nobody waits on this step
            return self.cap or IDLE
        return 0 if self.prompted >= PROBE else self.beside(decoding)

    def beside(self, decoding):
        """Prompt tokens for a step of TARGET times `decoding` rows alone, or FLOOR seconds if longer, by
        the fit: LEAST to `most`, and the cap."""
        fixed, per_row, per_token = self.fit()
        alone = fixed + per_row * decoding  # the step without prompt tokens
        goal = max(TARGET * alone, FLOOR) if self.xx[0, 0] else TARGET * alone  # seconds once measured
        n = (goal - alone) / per_token if alone > 0 and per_token > 0 else 0  # else a fit of noise: LEAST
        n = max(LEAST, min(int(n), self.most))
        return min(n, self.cap) if self.cap else n

    def fit(self):
        """(fixed, per decoding row, per prompt token): seconds, or the prior's units before any step."""
        scale = self.xy[0] / (self.xx[0] @ PRIOR) if self.xx[0, 0] else 1.0  # the prior, in seconds
        return np.linalg.solve(self.xx + RIDGE, self.xy + RIDGE @ PRIOR * scale)

    def took(self, decoding, prompt, seconds):
        """A step of `decoding` rows and `prompt` tokens took `seconds`. Only steps with decoding rows
        count: they are the ones the budget bounds, and they all run each token as a row of the
        compiled block, whereas a lone long prompt goes through BLAS, at another cost per token."""
        if decoding:
            self.prompted = self.prompted + 1 if prompt else 0
            x = np.array([1.0, decoding, prompt])
            self.xx = DECAY * self.xx + np.outer(x, x)
            self.xy = DECAY * self.xy + seconds * x

    @contextlib.contextmanager
    def step(self, decoding, prompt):
        """Time the step run inside as one of `decoding` rows and `prompt` tokens (a step that fails is not counted)."""
        began = self.clock()
        yield
        self.took(decoding, prompt, self.clock() - began)
