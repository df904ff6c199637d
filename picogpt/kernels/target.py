"""What the microkernel is compiled for: its vector width and the instruction of its int8 dot products.

Both come from the host (LLVM's view of its CPU features) unless overridden, so that one machine can
build and test the other shapes too: PICOGPT_LANES=16 gives AVX-512's tile (4 x 4 vectors of 16
float32), which an AVX2 host runs as pairs of 256-bit halves (slower, same arithmetic), and
PICOGPT_LANES=8 AVX2's (4 x 2 of 8). PICOGPT_INT8_DOT picks the int8 dot product: `vnni`
(vpdpbusd: AVX-VNNI or AVX-512 VNNI), `avx2` (vpmaddubsw + vpmaddwd) or `portable` (plain integer IR
that any LLVM target lowers). An instruction the host lacks is refused here: LLVM would abort the
process when compiling it. The kernels' cache folder is named by these settings too (kernels/__init__).
"""

import os

from llvmlite import binding

FEATURES = frozenset(binding.get_host_cpu_features().flatten().split(","))
AVX512 = "+avx512f" in FEATURES
VNNI = "+avxvnni" in FEATURES or {"+avx512vnni", "+avx512vl"} <= FEATURES
DOTS = ("vnni", "avx2", "portable")
RUNS = {"vnni": VNNI, "avx2": "+avx2" in FEATURES, "portable": True}  # which of DOTS this host can execute


class SettingError(OSError):
    """An environment variable's value the kernels cannot be built for (an OSError: the environment's,
    so the CLI says it in one line, as it does a missing file)."""


def _setting(name, default, allowed):
    value = os.environ.get(name) or default
    if value not in allowed:
        raise SettingError(f"{name} must be one of {', '.join(allowed)}, got {value!r}: unset it to use the host's")
    return value


LANES = int(_setting("PICOGPT_LANES", "16" if AVX512 else "8", ("8", "16")))  # float32 lanes per vector
DOT = _setting("PICOGPT_INT8_DOT", next(d for d in DOTS if RUNS[d]), DOTS)
if not RUNS[DOT]:
    raise SettingError(
        f"PICOGPT_INT8_DOT={DOT}: this CPU cannot execute it; use one of {', '.join(d for d in DOTS if RUNS[d])}"
    )


def name():
    """The shape and int8 dot product, for cache folders and benchmark figures: e.g. 'lanes8-avx2'."""
    return f"lanes{LANES}-{DOT}"
