"""The thread count: what the process may use, read from fake affinity and cgroup files (v1 and v2, in
a container and out of it), and the controller that adapts the count, driven by simulated call times
(no timed test: the clock and the seconds are the test's own)."""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picogpt import threads

V2_MOUNT = "31 25 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = (
    "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
    "33 30 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
    "34 30 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:10 - cgroup cgroup rw,memory\n"
)


def write(root, path, text):
    path = os.path.join(root, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def v2(root, path, limits):
    """A v2 host: this process in cgroup `path`; limits {folder below the mount: cpu.max's text}."""
    write(root, "proc/self/cgroup", f"0::{path}\n")
    write(root, "proc/self/mountinfo", V2_MOUNT)
    for folder, text in limits.items():
        write(root, os.path.join("sys/fs/cgroup", folder, "cpu.max"), text)


def v1(root, path, limits, mount_root="/"):
    """A v1 host (cpu and cpuacct mounted together); limits {folder: (quota, period)}."""
    write(root, "proc/self/cgroup", f"5:memory:{path}\n4:cpu,cpuacct:{path}\n0::/\n")
    write(root, "proc/self/mountinfo", V1_MOUNTS.replace("0:28 / ", f"0:28 {mount_root} "))
    for folder, (quota, period) in limits.items():
        write(root, os.path.join("sys/fs/cgroup/cpu,cpuacct", folder, "cpu.cfs_quota_us"), f"{quota}\n")
        write(root, os.path.join("sys/fs/cgroup/cpu,cpuacct", folder, "cpu.cfs_period_us"), f"{period}\n")


def test_no_limit_gives_the_affinity(tmp_path):
    v2(tmp_path, "/user.slice", {"": "max 100000\n", "user.slice": "max 100000\n"})
    assert threads.available(tmp_path, affinity={0, 1, 2, 3}, cores=4) == (4, "4 cores")
    assert threads.available(tmp_path, affinity={2}, cores=4) == (1, "1 of 4 cores by CPU affinity")


def test_v2_limit_rounds_up_and_takes_the_lowest_ancestor(tmp_path):
    v2(tmp_path, "/a/b", {"a": "150000 100000\n", "a/b": "max 100000\n"})
    n, why = threads.available(tmp_path, affinity=range(4), cores=4)
    assert n == 2 and why == "a CPU limit of 1.5 by cgroup v2 cpu.max, on 4 cores"
    v2(tmp_path, "/a/b", {"a": "300000 100000\n", "a/b": "50000 100000\n"})
    assert threads.available(tmp_path, affinity=range(4), cores=4).n == 1  # half a CPU: one thread


def test_v1_quota_in_a_container_whose_cgroup_is_its_mount_root(tmp_path):
    # without a cgroup namespace, /proc/self/cgroup names the host's path, and the container mounts
    # that path as its root: the limit is read at the mount point itself
    v1(tmp_path, "/docker/abc", {"": (100000, 100000)}, mount_root="/docker/abc")
    assert threads.available(tmp_path, affinity={0, 1}, cores=2) == (
        1,
        "a CPU limit of 1 by cgroup v1 cpu.cfs_quota_us, on 2 cores",
    )


def test_v1_without_a_quota_and_a_limit_above_the_affinity(tmp_path):
    v1(tmp_path, "/x", {"": (-1, 100000), "x": (-1, 100000)})
    assert threads.available(tmp_path, affinity={0, 1}, cores=2) == (2, "2 cores")
    v1(tmp_path, "/x", {"x": (800000, 100000)})  # 8 CPUs' worth on 2 cores: the cores bound it
    assert threads.available(tmp_path, affinity={0, 1}, cores=2) == (2, "2 cores")


def test_no_cgroup_files_at_all(tmp_path):
    assert threads.cgroup_limit(tmp_path) is None
    assert threads.available(tmp_path, affinity={0, 1, 2}, cores=3) == (3, "3 cores")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200), st.text(max_size=200))
def test_garbage_files_never_raise(tmp_path_factory, cgroup, mountinfo):
    root = tmp_path_factory.mktemp("junk")
    write(root, "proc/self/cgroup", cgroup)
    write(root, "proc/self/mountinfo", mountinfo)
    assert threads.available(root, affinity={0, 1}, cores=2).n in (1, 2)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_garbage_limits_are_no_limit(tmp_path_factory, quota, period):
    root = tmp_path_factory.mktemp("junk")
    v1(root, "/x", {"x": (quota, period)})
    v2(root, "/y", {"y": quota})
    assert threads.available(root, affinity={0, 1}, cores=2).n in (1, 2)


def test_this_machine():
    cpus = threads.available()
    assert 1 <= cpus.n <= len(os.sched_getaffinity(0)) and cpus.why


def test_ladder():
    assert threads.ladder(1) == [1] and threads.ladder(2) == [2, 1] and threads.ladder(6) == [6, 3, 1]
    assert threads.ladder(8) == [8, 4, 2, 1]


# ---- what the machine leaves this process, from fake /proc/stat ----------------------------------------


def stat(root, busy, idle):
    """A /proc/stat of CPUs 0 and 1 whose user time is busy[i] and idle time idle[i] (jiffies)."""
    lines = [f"cpu  {sum(busy)} 0 0 {sum(idle)} 0 0 0 0 0 0"]
    lines += [f"cpu{i} {b} 0 0 {d} 0 0 0 0 0 0" for i, (b, d) in enumerate(zip(busy, idle))]
    write(root, "proc/stat", "\n".join(lines) + "\nintr 1 2 3\n")


def test_spare_counts_what_others_used_of_our_cpus(tmp_path, monkeypatch):
    now = [0.0]
    mine = [0.0]
    monkeypatch.setattr(os, "times", lambda: os.times_result((mine[0], 0.0, 0.0, 0.0, 0.0)))
    stat(tmp_path, [0, 0], [0, 0])
    spare = threads.Spare(tmp_path, cpus={0, 1}, clock=lambda: now[0])
    hz = spare.hz
    # one second: this process used 1 CPU second, someone else another 1 on our CPUs
    now[0], mine[0] = 1.0, 1.0
    stat(tmp_path, [hz, hz], [0, 0])
    assert spare.free() == pytest.approx(1.0)
    # the next second: only this process (2 CPU seconds): both CPUs are left to it
    now[0], mine[0] = 2.0, 3.0
    stat(tmp_path, [2 * hz, 2 * hz], [0, 0])
    assert spare.free() == pytest.approx(2.0)
    # a CPU outside the affinity does not count
    spare = threads.Spare(tmp_path, cpus={0}, clock=lambda: now[0])
    now[0] = 3.0
    stat(tmp_path, [2 * hz, 3 * hz], [hz, 0])
    assert spare.free() == pytest.approx(1.0)
    assert spare.free() == pytest.approx(1.0)  # within the window: the last figure again


def test_spare_without_proc_stat_says_every_cpu(tmp_path):
    assert threads.Spare(tmp_path, cpus={0, 1, 2}).free() == 3


# ---- the controller, on simulated time ---------------------------------------------------------------


def drive(control, cost, calls, key="decode", spare=None):
    """Run `calls` calls through the controller; cost(i, n): seconds of call i on n threads. Returns
    the counts used and the total seconds."""
    used, total = [], 0.0
    for i in range(calls):
        n = control.choose(key)
        seconds = cost(i, n)
        control.took(key, n, seconds)
        used.append(n)
        total += seconds
    return used, total


def controller(most=2, spare=lambda: 2.0, clock=lambda: 0.0):
    return threads.Adaptive(most, spare=spare, clock=clock)


def test_idle_keeps_two_threads_and_tries_rarely():
    used, total = drive(controller(), lambda i, n: {2: 0.018, 1: 0.026}[n], 1000)
    assert used[-128:].count(2) >= 124  # 2 calls in 64 try the other count
    assert total <= 1.02 * 1000 * 0.018  # within 2% of always two threads
    used, total = drive(controller(), lambda i, n: {2: 0.018, 1: 0.026}[n], 64)
    assert total <= 1.04 * 64 * 0.018  # a short run pays for its first tries


def test_busy_goes_to_one_thread_and_back_when_the_load_leaves():
    busy = lambda i: 300 <= i < 700  # noqa: E731
    i = [0]
    cost = lambda j, n: (i.__setitem__(0, j), ({2: 0.046, 1: 0.026} if busy(j) else {2: 0.018, 1: 0.025})[n])[1]  # noqa: E731
    used, total = drive(controller(spare=lambda: 1.0 if busy(i[0]) else 2.0), cost, 1000)
    assert used[310:700].count(1) >= 0.95 * 390  # found within 10 calls of the load coming
    assert used[720:].count(2) >= 0.95 * 280  # and back within 20 of it leaving
    best = sum(min(cost(j, 1), cost(j, 2)) for j in range(1000))
    assert total <= 1.05 * best


def test_under_load_the_spare_cpus_keep_it_from_trying_more_threads():
    used, _ = drive(controller(spare=lambda: 1.0), lambda i, n: {2: 0.06, 1: 0.026}[n], 1000)
    assert used[100:].count(2) == 0
    used, _ = drive(controller(spare=lambda: 0.2), lambda i, n: {2: 0.06, 1: 0.026}[n], 1000)
    assert used.count(2) == 0  # the first count, too, is what the machine leaves


def test_two_copies_settle_on_one_thread_each():
    # Two controllers on one 2-core machine, taking turns call by call: a call on n threads takes
    # 0.02 s alone; beside the other copy's m threads, n + m > 2 threads stall at every barrier.
    counts, totals = [2, 2], [0.0, 0.0]
    a, b = (controller(spare=lambda me=me: 2.0 - counts[1 - me]) for me in (0, 1))
    for i in range(600):
        for me, control in enumerate((a, b)):
            n = counts[me] = control.choose("decode")
            other = counts[1 - me]
            seconds = {(1, 1): 0.024, (1, 2): 0.03, (2, 1): 0.045, (2, 2): 0.05}[(n, other)]
            control.took("decode", n, seconds)
            totals[me] += seconds
    assert counts == [1, 1]
    assert sum(600 / t for t in totals) >= 0.9 * 2 * 600 / (600 * 0.024)  # tokens/s summed, against 1 thread each


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.005, 0.2),  # two threads' seconds per call
    st.floats(0.5, 3.0),  # one thread's, as a multiple
    st.floats(0.0, 2.0),  # the CPUs the machine seems to leave (wrong at times: the times decide)
    st.integers(0, 2**32 - 1),
)
def test_never_much_worse_than_the_best_fixed_count_under_noise(two, ratio, spare, seed):
    import random

    rng = random.Random(seed)
    one = two * ratio
    # each call's time varies by up to +-20% around its count's mean, as a busy machine's do
    cost = lambda i, n: {2: two, 1: one}[n] * rng.uniform(0.8, 1.2)  # noqa: E731
    used, total = drive(controller(spare=lambda: spare), cost, 600)
    best = min(one, two) if spare >= 1.5 else one  # without spare CPUs it never tries 2: one thread is the bar
    assert total <= 1.1 * 600 * best


def test_kinds_of_call_are_measured_apart():
    control = controller(spare=lambda: 1.0)
    for _ in range(200):  # a prompt of 500 tokens: two threads pay; one token beside a busy process: one
        for key, cost in (("prompt", {2: 0.5, 1: 0.9}), ("decode", {2: 0.04, 1: 0.025})):
            n = control.choose(key)
            control.took(key, n, cost[n])
    assert control.choose("decode") == 1


def test_a_kind_unseen_for_long_is_measured_afresh():
    now, spare = [0.0], [2.0]
    control = controller(spare=lambda: spare[0], clock=lambda: now[0])
    drive(control, lambda i, n: {2: 0.04, 1: 0.02}[n], 40)
    assert control.choose("decode") == 1
    now[0] += threads.STALE + 1
    assert control.choose("decode") == 2  # from what the machine leaves now
    spare[0] = 0.5
    now[0] += threads.STALE + 1
    assert control.choose("decode") == 1


def test_a_rare_kind_asks_the_spare_cpus_after_a_gap():
    """A prompt between tokens (two copies each starting a generation): its kind last ran on two threads
    while the machine was idle; when it comes again after a gap and /proc/stat shows a neighbour, it
    runs on one at once, not after two slow calls (the calls of a kind that keeps running never ask
    between its looks)."""
    now, spare = [0.0], [2.0]
    control = controller(spare=lambda: spare[0], clock=lambda: now[0])
    for key in ("prompt", "decode"):
        control.took(key, control.choose(key), 0.01)
    assert control.choose("prompt") == 2
    spare[0] = 1.0
    assert control.choose("decode") == 2  # seen just now: its own times still speak for it
    now[0] += threads.GAP * 2
    assert control.choose("prompt") == 1
    spare[0] = 2.0  # and more is only tried, never taken, when the CPUs come back
    now[0] += threads.GAP * 2
    assert control.choose("prompt") == 1


def test_fixed_count_is_never_changed():
    control = threads.Adaptive(4, fixed=3, clock=lambda: 0.0)
    used, _ = drive(control, lambda i, n: 1.0 if n == 3 else 0.001, 100)
    assert set(used) == {3}


def test_use_fixes_or_adapts_the_process_count():
    import numba

    try:
        threads.use(1)
        assert threads.control().fixed == 1
        with threads.step("k") as n:
            assert n == 1 and numba.get_num_threads() == 1
        threads.use()
        control = threads.control()
        assert control.fixed is None and control.most == min(threads.available().n, numba.config.NUMBA_NUM_THREADS)
        with pytest.raises(ZeroDivisionError), threads.step("k"):
            raise ZeroDivisionError
        assert sum(control.calls.values()) == 0  # a failed call is not counted
    finally:
        threads.use()


# ---- what the command line says ------------------------------------------------------------------------


def test_info_and_verbose_say_the_threads_and_why(tiny):
    import subprocess

    from helpers import PICOGPT

    def picogpt(*args, cpus=None):
        return subprocess.run(
            [PICOGPT, *args],
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )

    cores = os.cpu_count()
    info = picogpt("info", "--model", tiny[0])
    assert info.returncode == 0, info.stderr
    assert any(line.startswith(f"threads     {threads.available().n} thread") for line in info.stdout.splitlines())
    pinned = picogpt("info", "--model", tiny[0], "--json", cpus={0})
    assert json.loads(pinned.stdout)["threads"] == f"1 thread (1 of {cores} cores by CPU affinity)" or cores == 1
    verbose = picogpt("generate", "x", "--model", tiny[0], "-n", "4", "-v", "--threads", "1")
    assert verbose.returncode == 0 and verbose.stderr.rstrip().endswith("weights, 1 thread (--threads)"), verbose.stderr
    adapted = picogpt("generate", "x", "--model", tiny[0], "-n", "4", "-v")
    if threads.available().n > 1:
        assert "at most" in adapted.stderr and "adapted to the load" in adapted.stderr
