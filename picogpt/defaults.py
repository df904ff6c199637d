"""The defaults that Model, the CLI and the server share (no imports: the CLI reads this before NumPy loads)."""

# Sampling: Model.generate and `picogpt generate` keep GPT-2's usual top-k of 50; the server takes
# OpenAI's completions defaults (16 new tokens, no top-k), the rest the same.
SAMPLING = dict(max_new_tokens=50, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0)
OPENAI = dict(SAMPLING, max_new_tokens=16, top_k=None)

# The server: sequences decoded together, requests waiting beyond them, prompt tokens prefilled per
# step (a chunk between two decoding steps: bounds the time between tokens while long prompts arrive;
# on gpt2 here a step of 4 decoding rows takes 8 ms, 21 ms with 16 prompt tokens, 30 with 32, 46 with 64).
SERVE = dict(host="127.0.0.1", port=8000, parallel=8, queue=64, chunk=32)
