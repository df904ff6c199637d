"""lm-evaluation-harness through `picogpt serve`, the prefix cache on and off: the harness's wall time
and whether its results are identical (issue 32's load b).

    python benchmarks/bench_eval.py [--lm-eval PATH] [--questions 40]

The harness is not a dependency: give the `lm_eval` command of a venv that has `lm-eval[api]` and
`transformers` (the tokenizer; no torch needed), as --lm-eval or $LM_EVAL. The task is built from
local files, as the tests build theirs: a multiple-choice task of --questions questions, each a
5-shot prompt (the same five examples before every question) and 4 choices, on random weights of
gpt2's shapes. lm-eval's `local-completions` sends each choice as its own request (echo, logprobs,
the context and the choice), one at a time; the tokenizer is the checkpoint folder's, through
transformers, offline. Nothing else may run meanwhile: check `uptime`.
"""

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
from compare_torch import random_checkpoint  # noqa: E402
from ports import free_port  # noqa: E402

TASK = """task: picogpt_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def task(folder, questions):
    rng = random.Random(0)
    words = [
        "the",
        "a",
        "model",
        "reads",
        "writes",
        "file",
        "list",
        "value",
        "error",
        "module",
        "function",
        "returns",
        "string",
        "number",
    ]
    say = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    shots = "\n\n".join(f"Question: {say(12)}?\nAnswer: {say(4)}" for _ in range(5))
    data = os.path.join(folder, "mc.jsonl")
    with open(data, "w") as f:
        for _ in range(questions):
            choices = [" " + say(rng.randint(2, 5)) for _ in range(4)]
            doc = {
                "context": f"{shots}\n\nQuestion: {say(10)}?\nAnswer:",
                "choices": choices,
                "label": rng.randint(0, 3),
            }
            f.write(json.dumps(doc) + "\n")
    with open(os.path.join(folder, "mc.yaml"), "w") as f:
        f.write(TASK.format(data=data))


def evaluate(lm_eval, model, folder, flags):
    """(wall seconds, per-sample responses, /metrics lines) of one lm_eval run against a fresh server."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "picogpt", "serve", "--model", model, "--port", str(port), *flags],
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        out = os.path.join(folder, "out-" + ("off" if flags else "on"))
        args = (
            f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={model},"
            "num_concurrent=1,max_retries=1,tokenized_requests=True"
        )
        start = time.perf_counter()
        subprocess.run(
            [lm_eval, "--model", "local-completions", "--model_args", args, "--tasks", "picogpt_mc"]
            + ["--include_path", folder, "--output_path", out, "--log_samples"],
            check=True,
            capture_output=True,
            env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        )
        wall = time.perf_counter() - start
        metrics = [
            line
            for line in httpx.get(url + "/metrics").text.splitlines()
            if line.startswith("picogpt_prefix_cache_") and "_created" not in line
        ]
    finally:
        server.send_signal(2)
        server.wait()
    samples = [json.loads(line) for line in open(glob.glob(f"{out}/*/samples_picogpt_mc_*.jsonl")[0])]
    return wall, [s["filtered_resps"] for s in samples], metrics


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-eval", default=os.environ.get("LM_EVAL") or shutil.which("lm_eval"))
    p.add_argument("--questions", type=int, default=40)
    args = p.parse_args()
    if not args.lm_eval:
        sys.exit("lm_eval not found: give --lm-eval PATH (a venv with lm-eval[api] and transformers)")
    with tempfile.TemporaryDirectory() as tmp:
        model = random_checkpoint("gpt2", os.path.join(tmp, "gpt2"))
        task(tmp, args.questions)
        on = evaluate(args.lm_eval, model, tmp, [])
        off = evaluate(args.lm_eval, model, tmp, ["--no-prefix-cache"])
    print(f"lm-evaluation-harness, local-completions, {args.questions} questions x 4 choices, gpt2 random weights\n")
    print("| picogpt serve | wall s | vs cache off | identical results |")
    print("|---|---|---|---|")
    print(f"| prefix cache on | {on[0]:.1f} | {on[0] / off[0]:.2f}x | {on[1] == off[1]} |")
    print(f"| --no-prefix-cache | {off[0]:.1f} | 1.00x | |")
    print("\n" + "\n".join(on[2]))


if __name__ == "__main__":
    main()
