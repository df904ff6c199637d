"""Ray Data on a local cluster: `--ray` gives the lines the command gives without it, and the Scorer and
Generator classes work under Dataset.map_batches as docs/corpora.md shows."""

import json
import random

import numpy as np
import pytest
from conftest import random_gpt2, save_checkpoint
from helpers import assert_one_line_error, run
from test_corpus import read_lines, texts, write_corpus

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    return save_checkpoint(random_gpt2(seed=3, n_positions=20), str(tmp_path_factory.mktemp("short")))


def same(a, b):
    """The same lines; scores to float32 rounding (a document's figures depend on the batch it shares)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(y[k], dict):  # --features
                same([x[k]], [y[k]])
                continue
            assert x[k] == (pytest.approx(y[k], rel=1e-6) if isinstance(y[k], float) else y[k]), (k, x, y)


def test_score_and_generate_through_ray_equal_the_command_without_it(short, tmp_path):
    batch = texts(random.Random(8), 36)
    source = write_corpus(tmp_path / "in.jsonl", batch, bad={5, 30})
    for extra in ([], ["--ray"]):
        out = ["-o", str(tmp_path / f"s{len(extra)}.jsonl"), "--features", "min-k=20,gltr,entropy"]
        r = run("score", "--jsonl", source, "--model", short, *out, *extra)
        assert r.returncode == 0, r.stderr
    same(read_lines(tmp_path / "s1.jsonl"), read_lines(tmp_path / "s0.jsonl"))
    assert any(line.get("features", {}).get("gltr") for line in read_lines(tmp_path / "s1.jsonl"))
    prompts = write_corpus(tmp_path / "p.jsonl", batch[:12], bad={3}, field="prompt")
    for extra in ([], ["--ray"]):
        args = ["--model", short, "-n", "6", "--seed", "5", "-o", str(tmp_path / f"g{len(extra)}.jsonl"), *extra]
        r = run("generate", "--jsonl", prompts, *args)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "g1.jsonl").read_bytes() == (tmp_path / "g0.jsonl").read_bytes()


def test_scorer_and_generator_under_map_batches(short, tmp_path):
    import picogpt.ray

    batch = [t for t in texts(random.Random(9), 20) if t]
    with open(tmp_path / "in.jsonl", "w") as f:
        for i, t in enumerate(batch):
            f.write(json.dumps({"id": i, "index": i, "text": t, "prompt": t[:10]}) + "\n")  # index: seed + index
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        ds = ray.data.read_json(str(tmp_path / "in.jsonl"))
        scored = ds.map_batches(
            picogpt.ray.Scorer,
            fn_constructor_kwargs={"model": short},
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=1,
        ).take_all()
        generated = ds.map_batches(
            picogpt.ray.Generator,
            fn_constructor_kwargs={"model": short, "params": {"max_new_tokens": 5, "seed": 3}},
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=1,
        ).take_all()
    finally:
        ray.shutdown()
    model = picogpt.load(short)
    for row, text in zip(sorted(scored, key=lambda r: r["id"]), batch):
        e = model.score_many([text])
        e = next(e)
        assert row["tokens"] == e["tokens"]
        if e["nll"] is not None:
            assert row["nll"] == pytest.approx(e["nll"], rel=1e-6)
    rows = sorted(generated, key=lambda r: r["id"])
    assert [r["text"] for r in rows] == [
        g["text"] for g in model.generate_many([t[:10] for t in batch], max_new_tokens=5, seed=3)
    ]


def test_a_failing_actor_is_one_line(tmp_path):
    source = write_corpus(tmp_path / "in.jsonl", ["one two three"])
    r = run("score", "--jsonl", source, "--model", str(tmp_path / "nope"), "--ray")
    assert_one_line_error(r, "the Ray job failed", "nope")
    assert r.returncode == 1


@pytest.mark.parametrize("command", ["score", "generate"])
def test_the_actors_load_the_model_as_the_command_without_ray_would(short, tmp_path, command):
    """--backend, --dtype and --kv-dtype reach the actors (before, --ray dropped --backend): the actor's
    answers for a batch equal those of the model the command loads without --ray."""
    import picogpt.ray
    from picogpt import cli

    field = "text" if command == "score" else "prompt"
    batch = [t for t in texts(random.Random(4), 8) if t]
    source = write_corpus(tmp_path / "in.jsonl", batch, field=field)
    options = ["--backend", "numpy", "--dtype", "float16", "--kv-dtype", "float16", "--ray"]
    options += ["--seed", "5", "-n", "6"] if command == "generate" else []
    args = cli.parser().parse_args([command, "--jsonl", source, "--model", short, *options])
    plan = cli.check(args)  # args stays as parsed: ray.py reads the SamplingParams from args.params
    fn, kwargs = picogpt.ray.actor_of(cli.job_of(args), args, plan.params)
    actor = fn(**kwargs)
    want = picogpt.load(short, backend="numpy", dtype="float16", kv_dtype="float16")
    assert repr(actor.model) == repr(want) and "numpy backend, float16 KV cache" in repr(want)
    out = actor({field: np.array(batch, dtype=object)})
    if command == "score":
        scores = list(want.score_many(batch))
        assert list(out["tokens"]) == [s["tokens"] for s in scores]
        assert list(out["nll"]) == pytest.approx(
            [np.nan if s["nll"] is None else s["nll"] for s in scores], nan_ok=True
        )
    else:
        assert list(out["text"]) == [g["text"] for g in want.generate_many(batch, plan.params)]
