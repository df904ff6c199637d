"""Ray Data, for corpora past one machine (`pip install 'picogpt[ray]'`).

`Scorer` and `Generator` are callable classes for `Dataset.map_batches`: each actor loads the model once
and sets the kernels' threads from the CPUs Ray gave it, then scores (Model.score_many) or continues
(Model.generate_many) each batch of rows:

    ds = ray.data.read_json("corpus.jsonl").map_batches(
        picogpt.ray.Scorer, fn_constructor_kwargs={"model": "gpt2"},
        compute=ray.data.ActorPoolStrategy(size=4), num_cpus=8)

`run` is what `picogpt score --jsonl ... --ray [ADDRESS]` and `generate --jsonl ... --ray` do: Ray Data
reads the files (one read task a file), the actors compute, and this process writes the result lines
in input order, as corpus.py does without Ray. Ray schedules; nothing here does.
"""

import logging
import math
import os
import warnings

import numpy as np

from . import corpus, features
from .options import SamplingParams

SCORES = ("tokens", "scored_tokens", "nll", "perplexity", "bits_per_byte", "bytes", "reason")
COUNTS = ("tokens", "scored_tokens", "bytes")  # whole numbers; the other figures are floats, NaN for none
TEXTS = ("text", "finish_reason", "prompt_tokens", "generated_tokens", "seed")
READ_CPUS = 0.5  # a read task's share of a CPU: it parses JSON, and the actors need the rest


def actor_threads():
    """The CPUs Ray assigned to this actor, rounded up (a read task's half CPU is brief): the kernels'
    threads. None outside Ray."""
    import ray

    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, math.ceil(cpus)) if cpus else None


class Actor:
    """Loads the model once per actor, on as many threads as it has CPUs at most (threads.py adapts the
    count to what else runs on the node)."""

    def __init__(
        self, model="gpt2", dtype=None, revision=None, field="text", threads=None, kv_dtype="float32", backend="numba"
    ):
        from . import threads as kernel_threads
        from .api import load

        # threads: a fixed count (--threads); else adapted to the load, up to the CPUs Ray gave the actor
        kernel_threads.use(threads, most=actor_threads(), why="--threads" if threads else "Ray's CPUs for the actor")
        self.model = load(model, backend=backend, dtype=dtype, revision=revision, kv_dtype=kv_dtype)
        self.field = field


class Scorer(Actor):
    """map_batches(Scorer, fn_constructor_kwargs={"model": ..., "field": "text", "stride": None}): adds
    Model.score_many's figures as columns (tokens, scored_tokens, nll, perplexity, bits_per_byte,
    bytes; NaN figures and a `reason` for a text under 2 tokens; a null text scores as "")."""

    def __init__(
        self,
        model="gpt2",
        dtype=None,
        revision=None,
        field="text",
        stride=None,
        threads=None,
        kv_dtype="float32",
        backend="numba",
        features=None,
        observer=None,
    ):
        super().__init__(model, dtype, revision, field, threads, kv_dtype, backend)
        self.stride, self.features = stride, features
        if observer:
            from .api import load

            observer = load(observer, backend=backend, dtype=dtype, revision=revision, kv_dtype=kv_dtype)
        self.observer = observer

    def __call__(self, batch):
        texts = ["" if t is None else str(t) for t in batch[self.field]]
        results = list(self.model.score_many(texts, self.stride, features=self.features, observer=self.observer))
        for name in results[0].get("features", ()) if results else ():  # a column of each feature
            batch[name] = np.empty(len(results), dtype=object)
            for i, r in enumerate(results):  # one by one: GLTR's lists stay lists
                batch[name][i] = r["features"][name]
        for key in SCORES:
            values = [r.get(key) for r in results]
            if key == "reason":
                batch[key] = np.array(values, dtype=object)
            elif key in COUNTS:
                batch[key] = np.array(values, np.int64)
            else:
                batch[key] = np.array([np.nan if v is None else v for v in values], np.float64)
        return batch


class Generator(Actor):
    """map_batches(Generator, fn_constructor_kwargs={"model": ..., "field": "prompt", "params":
    SamplingParams(...) or a dict of its fields, "rows": 8}): adds Model.generate_many's text,
    finish_reason, prompt_tokens, generated_tokens and seed as columns. With an `index` column, row
    `index` samples with seed + index (else the batch's rows are numbered from 0); a null prompt gets
    nulls."""

    def __init__(
        self,
        model="gpt2",
        dtype=None,
        revision=None,
        field="prompt",
        params=None,
        rows=8,
        threads=None,
        kv_dtype="float32",
        backend="numba",
    ):
        super().__init__(model, dtype, revision, field, threads, kv_dtype, backend)
        self.params = params if isinstance(params, SamplingParams) else SamplingParams.named({}, **(params or {}))
        self.rows = rows

    def __call__(self, batch):
        prompts = [None if p is None else str(p) for p in batch[self.field]]
        index = [int(i) for i in batch["index"]] if "index" in batch else list(range(len(prompts)))
        if all(b - a == 1 for a, b in zip(index, index[1:])):  # consecutive: one batch on the engine
            results = list(
                self.model.generate_many(prompts, self.params, rows=self.rows, start=index[0] if index else 0)
            )
        else:
            results = [
                next(self.model.generate_many([p], self.params, rows=1, start=i)) for p, i in zip(prompts, index)
            ]
        for key in TEXTS:
            batch[key] = np.array([None if r is None else r[key] for r in results], dtype=object)
        return batch


def datasource(job, skip):
    """A Ray Data datasource of the job's input lines after the first `skip`: columns index (the line's
    number among all, from 0) and the text (null for a bad line); one read task a file."""
    import pyarrow as pa
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    starts, n = [], 0
    for i, path in enumerate(job.paths):  # where each file's lines start among all: count all but the last file's
        starts.append(n)
        if i < len(job.paths) - 1:
            with corpus.open_input(path) as f:
                n += sum(1 for _ in f)

    def read(path, start):
        def blocks():
            index, texts = [], []
            for number, line in enumerate(corpus.read([path], job.field, job.id_field)):
                if start + number < skip:
                    continue
                index.append(start + number)
                texts.append(line.text)
                if len(index) == 256:
                    yield pa.table({"index": index, job.field: pa.array(texts, pa.string())})
                    index, texts = [], []
            if index:
                yield pa.table({"index": index, job.field: pa.array(texts, pa.string())})

        return blocks

    class JsonLines(Datasource):
        def estimate_inmemory_data_size(self):
            return corpus.size_of(job.paths)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(read(path, start), BlockMetadata(None, os.path.getsize(path), [path], None))
                for path, start in zip(job.paths, starts)
            ]

    return JsonLines()


def run(job, args, plan, progress=None):
    """picogpt score/generate --jsonl ... --ray [ADDRESS]: the same output as without --ray (scores equal
    to float32 rounding, as a document's figures depend on the batch it shares). args: the command's
    options; plan: what cli.check made of them (its threads and SamplingParams). Returns the Counts."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise corpus.CorpusError("--ray needs Ray: pip install 'picogpt[ray]'") from None
    local = args.ray == "local"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ray.init(
        address=None if local else args.ray,
        num_cpus=(plan.threads or cores) if local else None,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        configure_logging=True,
    )
    try:
        logging.getLogger("ray.data").setLevel(
            logging.CRITICAL
        )  # its plans, timings and stack traces: picogpt says it in one line
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        # One actor a node, on all its CPUs but a read task's share (read tasks starve otherwise)
        nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
        per_actor = max(1.0, min(nodes) - READ_CPUS)
        scoring = args.command == "score"
        fn, kwargs = actor_of(job, args, plan.params)
        wanted = [w.key for w in features.parse(job.features)] if scoring and job.features else []

        def compute(texts, done):
            ds = ray.data.read_datasource(datasource(job, done), num_cpus=READ_CPUS)
            with warnings.catch_warnings():  # max_restarts has no named parameter yet: Ray warns of its **kwargs
                warnings.simplefilter("ignore")
                ds = ds.map_batches(
                    fn,
                    fn_constructor_kwargs=kwargs,
                    compute=ray.data.ActorPoolStrategy(size=len(nodes)),
                    num_cpus=per_actor,
                    batch_size=128,
                    runtime_env=blas_threads(per_actor),
                    max_restarts=0,  # a failed actor fails the job (its error is the one line shown)
                )
            for _ in range(done):  # the lines answered already, checked by corpus.run
                next(texts)
            for row in ds.iter_rows():
                next(texts)  # keeps corpus.run's reading in step: it has the line's id and error
                out = figures(row, SCORES if scoring else TEXTS)
                yield out | ({"features": figures(row, wanted, keep_none=True)} if wanted else {})

        return corpus.run(job, compute, progress)
    except ray.exceptions.RayError as e:  # a worker's error: its last line is the one that says what
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise corpus.CorpusError(f"the Ray job failed: {lines[-1] if lines else type(e).__name__}") from None
    finally:
        ray.shutdown()


def actor_of(job, args, params=None):
    """The map_batches class for the command and its fn_constructor_kwargs: every option of the model
    that the command without --ray would load it with (params: generate's SamplingParams)."""
    model = dict(
        model=args.model,
        backend=args.backend,
        dtype=args.dtype,
        revision=args.revision,
        field=job.field,
        kv_dtype=args.kv_dtype,
    )
    if args.command == "score":
        return Scorer, dict(model, stride=job.stride, features=job.features, observer=job.observer)
    return Generator, dict(model, params=params, rows=job.rows)


def blas_threads(cpus):
    """The runtime_env that gives an actor of `cpus` CPUs as many BLAS threads as kernel threads: Ray
    sets OMP_NUM_THREADS to a task's whole CPUs, 1 for 1.5, which halved long prompts' matmuls; and
    OpenBLAS's short spin when idle (picogpt/__init__.py), as a worker loads NumPy before picogpt."""
    n = str(math.ceil(cpus))
    timeout = os.environ["OPENBLAS_THREAD_TIMEOUT"]  # set by importing picogpt, unless set already
    return {"env_vars": {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "OPENBLAS_THREAD_TIMEOUT": timeout}}


def figures(row, keys, keep_none=False):
    out = {}
    for key in keys:
        v = row.get(key)
        if isinstance(v, (float, np.floating)) and math.isnan(v):
            v = None
        elif isinstance(v, (np.generic, np.ndarray)):
            v = v.tolist()
        if key == "reason" and not v and not keep_none:
            continue
        out[key] = v
    return out
