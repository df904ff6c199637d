"""picogpt and llama.cpp when the cores are not theirs alone: beside busy processes, as several copies
at once, and under a container's CPU limit; each engine on its default threads and on each fixed count.

    python benchmarks/bench_busy.py [--size gpt2] [--dtypes float32 int8] [--loads 0 1 2] [--copies 2 3]

Random weights of the size's real shapes; llama.cpp reads the same weights as GGUF (float32 -> f32,
int8 -> q8_0; needs llama-cpp-python and its source, see llama_cpp_engine.py; left out with a note if
missing). Each measurement starts the other load, then its engine processes afresh (workers.py;
`picogpt default` then learns its thread count as a new `picogpt generate` would), waits for them
to load, then asks every copy at once for --repeats generations of --new-tokens greedy tokens after
a 16-token prompt, batch 1. Decode tokens/s leaves the first token (the prompt) out; copies are summed.
The other load: --loads plain Python busy loops; --copies copies of the same engine; and, where this
process may make a cgroup (root, with cgroup v1's cpu controller or v2's), one copy held to one
CPU by its quota (cpu.cfs_quota_us = cpu.cfs_period_us, or cpu.max "100000 100000").

Ratios, as issue 30 asks of them: picogpt's default against its best fixed count under the same load
(the median of each round's ratio: a round's engines run within a minute of each other), and against llama.cpp's default (every core, as llama.cpp's own tools choose); under the limit,
against one thread with no limit measured in the same rounds; idle, against picogpt on every core (the
default before it adapted), and again in one process, generations of the two alternated (--pairs):
the host's speed moves between processes run one after the other, not between alternate generations.
Nothing else may run meanwhile: check `uptime` first.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as importing picogpt does (bench_decode.py says why)

import llama_cpp_engine
import numpy as np
from compare_torch import SHAPES, converted, random_checkpoint
from workers import Worker, serve

LLAMA_TYPES = {"float32": "f32", "int8": "q8_0"}
BUSY = "while True: pass"
CGROUP_V1, CGROUP_V2 = "/sys/fs/cgroup/cpu", "/sys/fs/cgroup"


# ---- in the worker process ----------------------------------------------------------------------------


def stream_of(spec):
    """stream(ids, n): the n greedy new tokens after `ids`, each as it is chosen, on the engine `spec`
    names: picogpt:THREADS:FOLDER or llama.cpp:THREADS:GGUF (THREADS empty: the engine's default)."""
    kind, threads, where = spec.split(":", 2)
    if kind == "picogpt":
        if threads:  # as `--threads` does, before NumPy and Numba load
            for name in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
                os.environ[name] = threads
        import picogpt
        from picogpt.engine import decode_tokens

        if threads:
            picogpt.threads.use(int(threads))
        model = picogpt.load(where)
        greedy = lambda logits: int(np.argmax(logits))  # noqa: E731
        stream = lambda ids, n: decode_tokens(model.forward, model.params, model.config, ids, n, greedy)  # noqa: E731
        return stream, lambda: dict(picogpt.threads.control().calls)  # calls on each count
    return llama_cpp_engine.llama_generate(where, int(threads) if threads else None, streaming=True), dict


def paired(folder):
    """In one process, generations alternately on the default controller and on every core fixed, each
    keeping what it learned: the host's speed, which moves by tens of percent from minute to minute on a
    shared VM, then falls alike on both, as it does not on engines measured one after the other."""
    import statistics

    import picogpt
    from picogpt import threads
    from picogpt.engine import decode_tokens

    model = picogpt.load(folder)
    greedy = lambda logits: int(np.argmax(logits))  # noqa: E731
    default = threads.Adaptive(threads.control().most)
    fixed = threads.Adaptive(default.most, fixed=default.most)

    def timed(n, pairs, *ids):
        ids, n, ratios = [int(i) for i in ids], int(n), []
        for i in range(int(pairs)):
            seconds = {}
            for name, control in [("default", default), ("fixed", fixed)][:: 1 if i % 2 else -1]:
                threads._control[:] = [control]
                start = time.perf_counter()
                for _ in decode_tokens(model.forward, model.params, model.config, ids, n, greedy):
                    pass
                seconds[name] = time.perf_counter() - start
            ratios.append(seconds["fixed"] / seconds["default"])
        return {"ratio": statistics.median(ratios), "pairs": len(ratios), "calls": dict(default.calls)}

    timed(4, 1, *range(16))  # warm up
    serve(timed)


def worker(spec):
    if spec.startswith("paired:"):
        return paired(spec.split(":", 1)[1])
    stream, calls = stream_of(spec)

    def timed(n, repeats, *ids):
        ids, n = [int(i) for i in ids], int(n)
        first, decode, before = [], [], calls()
        for _ in range(int(repeats)):
            start = time.perf_counter()
            for i, _token in enumerate(stream(ids, n)):
                if i == 0:
                    began = time.perf_counter()
            first.append(began - start)
            decode.append(time.perf_counter() - began)
        used = {k: v - before.get(k, 0) for k, v in calls().items()}
        return {"first_ms": 1000 * float(np.mean(first)), "tok_s": len(decode) * (n - 1) / sum(decode), "calls": used}

    timed(4, 1, *range(16))  # warm up (kernels loaded, pages touched)
    serve(timed)


# ---- the other load -----------------------------------------------------------------------------------


@contextlib.contextmanager
def busy(n):
    """n processes spinning in plain Python, for as long as the block runs."""
    spinning = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
    try:
        yield
    finally:
        for p in spinning:
            p.kill()
            p.wait()


def cgroup_prefix():
    """(a command prefix that runs the rest in a new cgroup held to one CPU, its folder, how it is
    held), or None where this process may not make one (not root, no cgroup file system)."""
    name = f"picogpt-bench-{os.getpid()}"
    if os.path.isfile(os.path.join(CGROUP_V1, "cpu.cfs_quota_us")):
        base, files = CGROUP_V1, {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}
    elif os.path.isfile(os.path.join(CGROUP_V2, "cgroup.subtree_control")):
        base, files = CGROUP_V2, {"cpu.max": "100000 100000"}
    else:
        return None
    folder = os.path.join(base, name)
    try:
        if base == CGROUP_V2:  # the cpu controller, enabled for the root's children
            with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                f.write("+cpu")
        os.makedirs(folder, exist_ok=True)
        for file, value in files.items():
            with open(os.path.join(folder, file), "w") as f:
                f.write(value)
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
        return None
    join = f'echo $$ > {os.path.join(folder, "cgroup.procs")} && exec "$@"'
    return ["sh", "-c", join, "sh"], folder, " ".join(f"{k}={v}" for k, v in files.items())


# ---- measuring ------------------------------------------------------------------------------------------


def measure(spec, copies, load, prompt, args, prefix=()):
    """([tok/s of each copy], [picogpt's calls on each thread count, of each copy]) of `copies`
    processes of `spec` decoding at once beside `load` busy ones. The load is there from the start, and
    the copies start together, as a command run during a build, or replicas started at once, are."""
    workers = []
    with busy(load):
        try:
            for i in range(copies):
                workers.append(Worker(f"{spec} #{i}", spec, __file__, prefix, wait=False))
            for w in workers:
                w.ready()
            for w in workers:
                w.send(args.new_tokens, args.repeats, *prompt)
            answers = [w.answer() for w in workers]
        finally:
            for w in workers:
                w.close()
    time.sleep(1.0)  # idle threads stop spinning before the next engine starts
    return [a["tok_s"] for a in answers], [a["calls"] for a in answers]


def median_round(rounds):
    """The round whose copies' sum is the median of the rounds'."""
    return sorted(rounds, key=lambda r: sum(r[0]))[len(rounds) // 2]


def per_round(rounds):
    """picogpt default against the best fixed count, round by round (the engines of a round ran within
    a minute of each other; this host's speed moves between minutes, and a median of each engine's
    own rounds put them in different ones): the median of the rounds' ratios."""
    fixed = [n for n in rounds if n.startswith("picogpt ") and n != "picogpt default"]
    ratios = [
        sum(rounds["picogpt default"][r][0]) / max(sum(rounds[n][r][0]) for n in fixed)
        for r in range(len(rounds["picogpt default"]))
    ]
    return sorted(ratios)[len(ratios) // 2]


def shares(calls):
    """picogpt default's calls on each thread count, over its copies: e.g. '2: 3%, 1: 97%'."""
    total = {}
    for per_copy in calls:
        for n, k in per_copy.items():
            total[int(n)] = total.get(int(n), 0) + k
    every = sum(total.values()) or 1
    return ", ".join(f"{n}: {100 * k / every:.0f}%" for n, k in sorted(total.items(), reverse=True) if k)


def engines(folder, base, tmp, dtype, cores, with_llama):
    """{name: spec} for one format: picogpt default and each fixed count on `folder`, llama.cpp each
    count on the GGUF of `base` (the float32 weights: llama.cpp's converter quantizes them itself)."""
    specs = {"picogpt default": f"picogpt::{folder}"}
    specs |= {f"picogpt {n}": f"picogpt:{n}:{folder}" for n in range(cores, 0, -1)}
    if with_llama:
        path = llama_cpp_engine.gguf_files(base, [LLAMA_TYPES[dtype]], out_dir=tmp)[LLAMA_TYPES[dtype]]
        specs |= {f"llama.cpp {n}": f"llama.cpp:{n}:{path}" for n in range(cores, 0, -1)}
    return specs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", choices=SHAPES)
    p.add_argument("--dtypes", nargs="+", default=["float32", "int8"], choices=list(LLAMA_TYPES))
    p.add_argument("--loads", nargs="+", type=int, default=[0, 1, 2], help="busy processes beside one copy")
    p.add_argument("--copies", nargs="+", type=int, default=[2, 3], help="copies of each engine at once")
    p.add_argument("--limit", action=argparse.BooleanOptionalAction, default=True, help="one copy under a 1-CPU cgroup")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="generations per measurement, back to back")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every engine in turn; the median is shown")
    p.add_argument(
        "--llama", action=argparse.BooleanOptionalAction, default=llama_cpp_engine.available(), help="llama.cpp beside"
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=16,
        help="idle, in one process: generations of default and fixed alternated (0: none)",
    )
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "bench_busy.json"))
    args = p.parse_args()

    from picogpt import threads
    from picogpt.kernels import target

    cores = threads.available().n
    prompt = np.random.default_rng(0).integers(0, 50000, 16).tolist()
    limit = cgroup_prefix() if args.limit else None
    scenarios = [(f"{n} busy" if n else "idle", 1, n, ()) for n in args.loads]
    scenarios += [(f"{c} copies", c, 0, ()) for c in args.copies]
    if limit:
        scenarios.append(("1-CPU limit", 1, 0, limit[0]))
    print(
        f"{os.cpu_count()} cores ({threads.available().why}), kernels {target.name()}; "
        f"{args.size}, 16-token prompt + {args.new_tokens} greedy tokens, {args.repeats} generations per figure; "
        + (f"limit: {limit[2]}" if limit else "no cgroup could be made: no limit row")
    )
    report = {"setup": vars(args) | {"kernels": target.name(), "when": time.strftime("%Y-%m-%d %H:%M")}, "rows": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base = random_checkpoint(args.size, os.path.join(tmp, "float32"))
            for dtype in args.dtypes:
                folder = converted(base, dtype, os.path.join(tmp, dtype))
                specs = engines(folder, base, tmp, dtype, cores, args.llama)
                names = list(specs)
                print(f"\n{dtype}: decode tokens/s (copies: each, and their sum)")
                print(
                    "| other load | "
                    + " | ".join(names)
                    + " | default / best fixed | default / llama.cpp | default / reference | default's steps |"
                )
                print("|---|" + "---|" * (len(names) + 4))
                for scenario, copies, load, prefix in scenarios:
                    rounds = {n: [] for n in specs}  # engines interleaved, round after round
                    if prefix:  # the reference, one thread with the CPU to itself, in the same rounds
                        rounds["picogpt 1, no limit"] = []
                    for _ in range(args.rounds):
                        for n, spec in specs.items():
                            rounds[n].append(measure(spec, copies, load, prompt, args, prefix))
                        if prefix:
                            rounds["picogpt 1, no limit"].append(measure(specs["picogpt 1"], 1, 0, prompt, args))
                    reference = rounds.pop("picogpt 1, no limit", None)
                    row = {n: median_round(r) for n, r in rounds.items()}  # (tok/s of each copy, calls)
                    total = {n: sum(tok_s) for n, (tok_s, _) in row.items()}
                    default = total["picogpt default"]
                    ratios = [
                        f"{per_round(rounds):.2f}x",
                        f"{default / total[f'llama.cpp {cores}']:.2f}x" if args.llama else "",
                    ]
                    if scenario == "idle":  # against every core, the default before it adapted
                        ratios.append(f"{default / total[f'picogpt {cores}']:.2f}x of picogpt {cores}")
                    elif reference:  # the 1-CPU limit, against one thread with the CPU to itself
                        ratios.append(f"{default / sum(median_round(reference)[0]):.2f}x of picogpt 1, no limit")
                    else:
                        ratios.append("")
                    cells = [
                        " + ".join(f"{x:.1f}" for x in tok_s) + (f" = {sum(tok_s):.1f}" if len(tok_s) > 1 else "")
                        for tok_s, _ in row.values()
                    ]
                    print(
                        f"| {scenario} | " + " | ".join(cells + ratios + [shares(row["picogpt default"][1])]) + " |",
                        flush=True,
                    )
                    report["rows"].append(
                        {"dtype": dtype, "scenario": scenario, "rounds": rounds}
                        | ({"reference": reference} if reference else {})
                    )
                    with open(args.json, "w") as f:
                        json.dump(report, f, indent=2)
                if args.pairs:
                    worker = Worker("paired", f"paired:{folder}", __file__)
                    try:
                        answer = worker.ask(args.new_tokens, args.pairs, *prompt)
                    finally:
                        worker.close()
                    print(
                        f"idle, in one process, {answer['pairs']} generations each alternated: default / picogpt {cores} "
                        f"= {answer['ratio']:.3f}x (median of pairs; default's steps {shares([answer['calls']])})",
                        flush=True,
                    )
                    report["rows"].append({"dtype": dtype, "scenario": "idle, paired", **answer})
                    with open(args.json, "w") as f:
                        json.dump(report, f, indent=2)
    finally:
        if limit:
            os.rmdir(limit[1])
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[sys.argv.index("--worker") + 1])
    else:
        main()
