"""How many threads the kernels run on: what the process may use, and how many pay under the load it finds.

`available()` is what the process may really use: its CPU affinity (`taskset`, a cpuset), capped by
its container's CPU limit (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, the
lowest on the way up the hierarchy), rounded up, as Go's runtime and the JVM size themselves:
`os.cpu_count()` says 2 under a limit of one CPU, and two threads there ran at 0.65x one.

`Adaptive` then chooses, call by call, how many of those threads a forward pass uses. A step is on the
order of a hundred parallel regions, each ending in a barrier; when another process wants the cores
too, a thread that still has work waits for a time slice while its partner spins, and two threads ran
at 0.57x one beside one busy process, at a quarter with two copies of picogpt. No count is right for
every load, and the load comes and goes, so the controller measures: each kind of call (its number
of tokens, to a power of two) keeps a moving average of its seconds on the count in use. A
neighbour's load moves the count one down the ladder at once, with no try (a call on too many threads
costs time slices): when SLOW calls in a row are MOVED times slower than their average, or when
`Spare` (from /proc/stat) shows the CPUs in use taken. One count up is tried for PROBE calls only when
`Spare` shows the CPUs for it left free, and takes over if HYSTERESIS faster; so beside a busy
neighbour no call is spent on a try that cannot win. One down is also tried now and then whatever
/proc/stat says, from 32 calls in up to every EVERY (512): idle, under 1% of the calls.
"""

import math
import os
import time
from typing import NamedTuple

PROBE = 2  # calls a try lasts: one call is noisy on a busy machine
FIRST = 4  # calls before the first try of a kind of call, and after a change of count
CHECK = 8  # calls between looks at the spare CPUs while no count is worth a try
EVERY = 512  # the most calls between tries while the choice holds (idle, a try every 64 cost int8 gpt2 8-13%)
HYSTERESIS = 0.08  # a tried count takes over when its calls are this much faster
WEIGHT = 0.25  # a new call's weight in its count's moving average
MOVED, SLOW = 1.5, 2  # SLOW calls in a row this many times slower than the average: the load came
STALE = 5.0  # seconds after which a kind of call unseen since is measured afresh
GAP = 0.05  # seconds after which a kind of call unseen since asks /proc/stat before it runs (a prompt between tokens)


class Cpus(NamedTuple):
    """How many CPUs the process may use, and why (for `picogpt info` and -v)."""

    n: int
    why: str


def available(root="/", affinity=None, cores=None):
    """The CPUs this process may use: its affinity, capped by its container's CPU limit (rounded up).
    Tests pass a folder of fake /proc and /sys files as root, a set of CPUs as affinity and a count of cores."""
    cores = cores or os.cpu_count() or 1
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(cores)
    n = len(affinity)
    mine = f"{n} of {plural(cores, 'core')} by CPU affinity" if n < cores else plural(cores, "core")
    limit = cgroup_limit(root)
    if limit is not None and math.ceil(limit[0] - 1e-9) < n:
        quota, where = limit
        return Cpus(max(1, math.ceil(quota - 1e-9)), f"a CPU limit of {quota:g} by {where}, on {mine}")
    return Cpus(n, mine)


def plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def cgroup_limit(root="/"):
    """(CPUs, which file said so) of the lowest CPU limit over this process's cgroup and its parents,
    or None where there is none (or no cgroup file system to read)."""
    try:
        memberships = _read(root, "proc/self/cgroup").splitlines()
        mounts = [m for m in map(_mount, _read(root, "proc/self/mountinfo").splitlines()) if m]
    except (OSError, ValueError):  # no such files (not Linux), or not text
        return None
    found = []
    for line in memberships:  # "0::/path" (v2) or "4:cpu,cpuacct:/path" (v1)
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        version = 2 if controllers == "" else 1 if "cpu" in controllers.split(",") else None
        for kind, options, mount_root, point in mounts:
            if version == 2 and kind == "cgroup2" or version == 1 and kind == "cgroup" and "cpu" in options:
                found += _limits(root, version, point, _relative(path, mount_root))
                break
    return min(found, default=None)


def _read(root, path):
    with open(os.path.join(root, path)) as f:
        return f.read()


def _mount(line):
    """(file system type, super options, root within the hierarchy, mount point) of a mountinfo line
    (None for a line that is not one)."""
    fields = line.split()
    if "-" not in fields[5:-1]:
        return None
    rest = fields[fields.index("-", 5) + 1 :]  # after the optional fields: type, source, super options
    return rest[0], set(rest[2].split(",")) if len(rest) > 2 else set(), fields[3], fields[4]


def _relative(path, mount_root):
    """The cgroup path below its mount (a container often mounts its own cgroup as the root)."""
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root) :]
    return path.strip("/")


def _limits(root, version, point, path):
    """The CPU limits of the cgroup at `path` under the mount point and of each parent up to the mount."""
    parts = path.split("/") if path else []
    out = []
    for depth in range(len(parts), -1, -1):
        folder = os.path.join(root, point.lstrip("/"), *parts[:depth])
        try:
            if version == 2:
                quota, period = _read(folder, "cpu.max").split()[:2]
                name = "cgroup v2 cpu.max"
            else:
                quota, period = _read(folder, "cpu.cfs_quota_us"), _read(folder, "cpu.cfs_period_us")
                name = "cgroup v1 cpu.cfs_quota_us"
            cpus = int(quota) / int(period) if quota.strip() not in ("max", "-1") else None
        except (OSError, ValueError, ZeroDivisionError):  # no such file, or not a limit
            continue
        if cpus is not None and cpus > 0:
            out.append((cpus, name))
    return out


def ladder(most):
    """The thread counts tried: most, halved down to 1 (2: 2 and 1; 8: 8, 4, 2, 1)."""
    counts = [most]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return counts


class Spare:
    """free(): how many of this process's CPUs the rest of the machine left it since the last call
    (its CPUs less what other processes, and a hypervisor's steal, used of them), from /proc/stat and
    os.times(). root, cpus, clock: tests pass fake files, CPUs and time."""

    def __init__(self, root="/", cpus=None, clock=time.monotonic):
        self.root, self.clock = root, clock
        if cpus is None:
            cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        self.cpus = set(cpus)
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last, self.spare = self._read(), float(len(self.cpus))

    def _read(self):
        """(when, CPU seconds used on our CPUs by anyone, by this process), or None without /proc/stat."""
        try:
            with open(os.path.join(self.root, "proc/stat")) as f:
                lines = [line.split() for line in f if line.startswith("cpu") and not line.startswith("cpu ")]
            busy = 0
            for fields in lines:
                if int(fields[0][3:]) in self.cpus:  # user nice system idle iowait irq softirq steal ...
                    busy += sum(int(v) for v in fields[1:4]) + sum(int(v) for v in fields[6:9])
        except (OSError, ValueError, IndexError):
            return None
        mine = os.times()
        return self.clock(), busy / self.hz, mine.user + mine.system

    def free(self, window=0.05):
        """The CPUs left to this process on average since the last reading at least `window` s ago."""
        if self.last is not None and self.clock() - self.last[0] < window:
            return self.spare  # not read again: a look per call would cost 26 us
        now = self._read()
        if now is None or self.last is None:
            return self.spare
        (then, busy0, mine0), (when, busy1, mine1) = self.last, now
        others = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / (when - then)
        self.last, self.spare = now, max(0.0, len(self.cpus) - others)
        return self.spare


class Kind:
    """What the controller knows of one kind of call: the latest seconds of each count."""

    def __init__(self, using):
        self.seconds = {}  # count -> seconds a call (a moving average for the count in use)
        self.using = using
        self.trying, self.tried = None, []  # a count being tried, and its calls' seconds so far
        self.since, self.every = 0, FIRST  # calls since the last try, and between tries
        self.due = FIRST  # the call (counted in `since`) at which to look for a count to try
        self.slow = 0  # calls in a row far slower than the average
        self.seen = 0.0  # when the last call ended


class Adaptive:
    """Chooses each call's thread count among ladder(most) from the seconds calls of its kind took.
    fixed: always that count (`--threads N`). spare(): the CPUs the machine leaves this process
    (Spare.free); clock: seconds (tests pass their own)."""

    def __init__(self, most, fixed=None, spare=None, clock=time.monotonic):
        self.most, self.fixed, self.clock = most, fixed, clock
        self.spare = spare or SPARE.free
        self.counts = ladder(most)[::-1]  # 1 first
        self.kinds = {}
        self.calls = dict.fromkeys(self.counts, 0)  # calls on each count, for -v

    def __repr__(self):
        if self.fixed:
            return f"<picogpt.threads.Adaptive: fixed at {self.fixed}>"
        using = {k: kind.using for k, kind in self.kinds.items()}
        return f"<picogpt.threads.Adaptive: up to {self.most}; in use by kind of call {using}>"

    def fits(self, free, slack=0.5):
        """The largest count that the CPUs left to this process hold, give or take `slack` of a CPU."""
        return max([n for n in self.counts if n <= free + slack], default=1)

    def choose(self, key):
        """The thread count for the next call of kind `key`."""
        if self.fixed:
            return self.fixed
        kind = self.kinds.get(key)
        if kind is None or self.clock() - kind.seen > STALE:
            kind = self.kinds[key] = Kind(self.fits(self.spare()))
        elif kind.trying is None and kind.since >= kind.due:
            self._look(kind)
        elif kind.trying is None and self.clock() - kind.seen > GAP and self.fits(self.spare()) < kind.using:
            self._down(kind)  # a rare kind's own times are old: the load came meanwhile (two copies' prompts)
        return kind.using if kind.trying is None else kind.trying

    def _look(self, kind):
        """What to do next on kind's calls: try one count up the ladder if the machine leaves the CPUs
        for it; go one down at once if it does not leave those in use; try one down now and then
        regardless, from 32 calls in up to every EVERY (a neighbour's load that /proc/stat does not
        show, such as a hypervisor's that it does not count as steal); else look again soon."""
        i, free = self.counts.index(kind.using), self.spare()
        # a band between going down and trying up: /proc/stat's figure over a few calls is noisy,
        # and a try of more threads beside a neighbour's busy thread costs time slices
        if i + 1 < len(self.counts) and self.counts[i + 1] <= self.fits(free, slack=0.25):
            kind.trying = self.counts[i + 1]
        elif i and self.fits(free) < kind.using:
            self._down(kind)
        elif i and kind.since >= min(8 * kind.every, EVERY):
            kind.trying = self.counts[i - 1]
        else:
            kind.due = kind.since + CHECK

    def took(self, key, n, seconds):
        """A call of kind `key` on n threads took `seconds`."""
        self.calls[n] = self.calls.get(n, 0) + 1
        kind = self.kinds.get(key)
        if self.fixed or kind is None:
            return
        kind.seen = self.clock()
        if n == kind.trying:
            kind.tried.append(seconds)
            if len(kind.tried) < PROBE:
                return
            mean, before = sum(kind.tried) / len(kind.tried), kind.seconds.get(kind.using)
            kind.seconds[n] = mean  # a try's own figure: the latest there is of that count
            kind.trying, kind.tried, kind.since = None, [], 0
            if before is not None and mean < before * (1 - HYSTERESIS):
                kind.using, kind.every = n, FIRST
            else:
                kind.every = min(2 * kind.every, EVERY)
            kind.due = kind.every
        elif n == kind.using:
            average = kind.seconds.get(n) or seconds
            kind.slow = kind.slow + 1 if seconds > MOVED * average else 0
            kind.seconds[n] = (1 - WEIGHT) * average + WEIGHT * seconds
            kind.since += 1
            if kind.slow >= SLOW:  # the load came: fewer threads now (a try of more follows if CPUs are spare)
                self._down(kind)

    def _down(self, kind):
        """One count down the ladder at once, without a try: a neighbour's load is what made the calls
        slow, and each call on too many threads costs time slices; more are tried again when the
        CPUs are spare (one call in `FIRST` looks)."""
        i = self.counts.index(kind.using)
        if i:
            kind.using = self.counts[i - 1]
            kind.seconds[kind.using] = None
        kind.trying, kind.tried, kind.since, kind.due, kind.every, kind.slow = None, [], 0, FIRST, FIRST, 0


SPARE = Spare()  # read from here on: the first kernels' call knows what the machine did while the model loaded
_control = []  # [the process's Adaptive], made on first use
_wanted = {"n": None, "most": None, "why": None}  # what `use` asked for


def use(n=None, most=None, why=None):
    """Run the kernels on n threads always (`--threads n`), or, with n None, adapt the count to the
    load up to `most` (default: every CPU `available()` gives). why: what set them, for `describe`.
    Numba's pool (NUMBA_NUM_THREADS, read when Numba loads) bounds both."""
    _wanted.update(n=n, most=most, why=why)
    _control.clear()


def control():
    """The process's Adaptive, as `use` asked (by default adaptive up to `available()`)."""
    if not _control:
        import numba

        pool, n, most = numba.config.NUMBA_NUM_THREADS, _wanted["n"], _wanted["most"]
        _control.append(Adaptive(min(most or available().n, pool), fixed=min(n, pool) if n else None))
    return _control[0]


def describe(adapted=True):
    """How many threads and why, for `picogpt info` and -v: '2 threads at most (2 cores), adapted to
    the load' (adapted=False, for the NumPy backend, whose BLAS threads are not: '2 threads (2 cores)')."""
    if _wanted["n"]:
        return f"{plural(_wanted['n'], 'thread')} ({_wanted['why'] or 'fixed'})"
    cpus = available()
    most = min(_wanted["most"] or cpus.n, int(os.environ.get("NUMBA_NUM_THREADS") or cpus.n))
    why = _wanted["why"] or (cpus.why if most == cpus.n else "NUMBA_NUM_THREADS")
    if most > 1 and adapted:
        return f"{plural(most, 'thread')} at most ({why}), adapted to the load"
    return f"{plural(most, 'thread')} ({why})"


def used():
    """'1 thread on most steps' (of the forward calls made so far), or '' before any."""
    calls = _control[0].calls if _control and not _control[0].fixed else {}
    if len(calls) < 2 or not any(calls.values()):
        return ""
    return f"{plural(max(calls, key=calls.get), 'thread')} on most steps"


class step:
    """`with step(key):` runs the kernels inside on the count chosen for calls of kind `key`, and
    tells the controller how long they took (a call that fails is not counted)."""

    def __init__(self, key):
        self.control, self.key = control(), key

    def __enter__(self):
        import numba

        self.n = self.control.choose(self.key)
        numba.set_num_threads(self.n)  # Numba's count is the calling thread's own
        self.began = time.perf_counter()
        return self.n

    def __exit__(self, kind, *_):
        if kind is None:
            self.control.took(self.key, self.n, time.perf_counter() - self.began)
