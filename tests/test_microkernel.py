"""The one matmul kernel (microkernel.py) against each format's NumPy reference (model.linear: widen
then multiply, or int8's integer arithmetic), for every weight format, 1 to 17 rows (every tile height
and remainder), widths that are not multiples of 8, 32 or a panel, and the bias, GELU and residual
fusions; kernels.linear on both sides of ROWS_MAX; and the other vector width and int8 dot product
than the host's (target.py), in a subprocess."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_close, normal
from hypothesis import given, settings
from hypothesis import strategies as st

from picogpt import formats, kernels, model
from picogpt.kernels import microkernel, target

rng = np.random.default_rng(11)
randn = normal(rng)


NONE = np.empty((0, 0), np.float32)


def test_every_format_row_names_a_tile_the_microkernel_has():
    """The microkernel reads a format's behaviour from its row of formats.FORMATS: integer
    arithmetic (_tile_q8), or a widening it has the code for."""
    for fmt in formats.FORMATS.values():
        assert fmt.integer != (fmt.widen in microkernel.WIDEN), fmt


@pytest.mark.parametrize("dtype", formats.DTYPES)
@pytest.mark.parametrize("n_in,n_out", [(1, 1), (7, 13), (37, 101), (33, 64), (96, 70), (200, 129)])
def test_every_row_count_and_fusion_equals_the_reference(dtype, n_in, n_out):
    w = formats.pack(randn(n_in, n_out, scale=0.3), dtype)
    b = randn(n_out)
    plain, with_gelu = microkernel.linear_of(w, b), microkernel.linear_of(w, b, gelu=True)
    for n_rows in range(1, 18):
        x, res = randn(n_rows, n_in), randn(n_rows, n_out)
        threads = 1 + n_rows % 3
        assert_close(microkernel.linear(x, *plain, NONE, threads), model.linear(x, w, b))
        assert_close(microkernel.linear(x, *plain, res, threads), model.linear(x, w, b) + res)
        assert_close(microkernel.linear(x, *with_gelu, NONE, threads), model.gelu(model.linear(x, w, b)))


@pytest.mark.parametrize("dtype", formats.DTYPES)
def test_a_row_is_the_same_bits_alone_two_panels_at_a_time_as_in_a_tile_of_four(dtype):
    """Up to WIDE_ROWS rows, a float tile takes two panels at once (a thread's odd panel alone); each
    output still sums in the same order, so one or two rows give the bits they get among five rows (a
    tile of four and one of one, a panel at a time), on any number of threads."""
    n_in, n_out = 75, 5 * microkernel.P - 3  # five panels, the last one partial
    w, b = formats.pack(randn(n_in, n_out, scale=0.3), dtype), randn(n_out)
    lin, x = microkernel.linear_of(w, b), randn(5, n_in)
    five = microkernel.linear(x, *lin, NONE, 1)
    assert_close(five, model.linear(x, w, b))
    for threads in (1, 2, 3):
        for rows in range(1, microkernel.WIDE_ROWS + 1):
            assert np.array_equal(microkernel.linear(x[:rows], *lin, NONE, threads), five[:rows]), (threads, rows)


@pytest.mark.parametrize("dtype", formats.DTYPES)
@pytest.mark.parametrize("n_in,n_out,n_rows", [(768, 2304, 1), (3072, 768, 8), (48, 50257, 3)])
def test_model_sized_matrices(dtype, n_in, n_out, n_rows):
    w = formats.pack(randn(n_in, n_out, scale=0.05), dtype)
    x, b = randn(n_rows, n_in), randn(n_out)
    got = microkernel.linear(x, *microkernel.linear_of(w, b), NONE, 2)
    assert_close(got, model.linear(x, w, b))


@pytest.mark.parametrize("dtype", [d for d in formats.DTYPES if not formats.FORMATS[d].integer])
def test_panels_are_the_weight_zero_padded(dtype):
    w = formats.pack(randn(45, 150), dtype)
    panels = microkernel.panels(w)
    data = panels if dtype == "float32" else panels.data
    assert data.shape == (-(-150 // microkernel.P), 45, microkernel.P)
    wide = microkernel.widen_(np.empty((45, 150), np.float32), panels)  # back to [in, out]: exact
    assert np.array_equal(wide, formats.dequantize(w))
    flat = data.transpose(1, 0, 2).reshape(45, -1)
    assert not flat[:, 150:].any()  # the padding is zeros


@pytest.mark.parametrize("dtype", formats.DTYPES)
@pytest.mark.parametrize("past", [None, 0, 1])  # 1 row (None), rows_max rows, one more (int8: 256 and 257, rows too)
def test_kernels_linear_on_both_sides_of_rows_max(dtype, past):
    w = formats.pack(randn(45, 70, scale=0.3), dtype)
    rows = kernels.rows_max(w)
    n_rows = 1 if past is None else (rows if rows < float("inf") else 256) + past
    x, b, res = randn(n_rows, 45), randn(70), randn(n_rows, 70)
    assert_close(kernels.linear(x, microkernel.linear_of(w, b)), model.linear(x, w, b))
    assert_close(kernels.linear(x, microkernel.linear_of(w, b), res), model.linear(x, w, b) + res)
    assert_close(kernels.linear(x, microkernel.linear_of(w, b, gelu=True)), model.gelu(model.linear(x, w, b)))


def test_int8_panels_hold_each_outputs_weights_four_input_rows_at_a_time():
    w = formats.pack(randn(45, 150), "int8")
    panels = microkernel.panels(w)
    n_blocks = -(-45 // 32)
    assert panels.data.shape == (-(-150 // microkernel.P), n_blocks * 8, microkernel.P, 4)
    assert panels.scales.shape == (-(-150 // microkernel.P), n_blocks, microkernel.P)
    back = panels.data.transpose(1, 3, 0, 2).reshape(n_blocks * 32, -1)  # [in padded, out padded]
    assert np.array_equal(back[:45, :150], w.data) and not back[45:].any() and not back[:, 150:].any()


@given(
    st.integers(1, 9),
    st.integers(1, 100),
    st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_activations_are_quantized_exactly_as_the_reference(n_rows, n_in, scale, seed):
    """quantize_rows (compiled without fastmath) gives formats.quantize_rows's int8 and scales bit for
    bit, for any size, including zero rows and blocks, halves that round to even, and huge or tiny values."""
    g = np.random.default_rng(seed)
    x = (g.standard_normal((n_rows, n_in)) * scale).astype(np.float32)
    x[g.random((n_rows, n_in)) < 0.2] = 0
    if n_rows > 1:
        x[1] = 0  # a row of zeros: scale 0
    x[0, : min(n_in, 3)] = np.float32([127, 0.5, -1.5])[: min(n_in, 3)] * np.float32(scale)  # halves
    q, d = microkernel.quantize_rows(x)
    q_ref, d_ref = formats.quantize_rows(x)
    assert np.array_equal(q, q_ref) and np.array_equal(d, d_ref)
    assert np.abs(q.astype(np.int32)).max(initial=0) <= 127


@pytest.mark.slow
@pytest.mark.parametrize(
    "env",
    [{"PICOGPT_LANES": "16" if target.LANES == 8 else "8"}, {"PICOGPT_INT8_DOT": "portable"}],
    ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()),
)
def test_the_other_shapes_equal_the_reference_too(env):
    """The kernels compiled for the vector width the host does not pick (an AVX-512 tile on AVX2 runs
    as pairs of halves), and int8's portable dot product: this file's tests, in a process of their own."""
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            os.path.join(here, "test_microkernel.py"),
            "-m",
            "not slow",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
        cwd=os.path.dirname(here),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-500:]


def test_the_shape_is_the_one_asked_for():
    """PICOGPT_LANES and PICOGPT_INT8_DOT (as the test above sets them) decide the compiled shape."""
    assert int(os.environ.get("PICOGPT_LANES") or (16 if target.AVX512 else 8)) == microkernel.LANES
    assert microkernel.P == microkernel.C * microkernel.LANES and (4 if microkernel.LANES == 16 else 2) == microkernel.C
    assert (os.environ.get("PICOGPT_INT8_DOT") or ("vnni" if target.VNNI else "avx2")) == target.DOT
    assert microkernel.DOT[target.DOT] is not None


def test_a_setting_the_host_cannot_run_is_refused_in_one_line():
    for env, message in [
        ({"PICOGPT_LANES": "12"}, "PICOGPT_LANES must be one of 8, 16"),
        ({"PICOGPT_INT8_DOT": "sse"}, "PICOGPT_INT8_DOT must be one of"),
    ] + ([] if target.VNNI else [({"PICOGPT_INT8_DOT": "vnni"}, "this CPU cannot execute it")]):
        result = subprocess.run(
            [sys.executable, "-c", "import picogpt.kernels.target"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0 and message in result.stderr, result.stderr
        cli = subprocess.run(
            [sys.executable, "-m", "picogpt", "generate", "x", "--model", "tiny", "-n", "1"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 1 and cli.stderr.startswith("picogpt: error: ") and "Traceback" not in cli.stderr, (
            cli.stderr
        )
        assert len(cli.stderr.strip().splitlines()) == 1 and message in cli.stderr, cli.stderr


def test_vnni_is_emitted_for_a_cpu_that_has_it():
    """vpdpbusd cannot run here (AVX2 only), but the IR the int8 tile emits for it compiles to it for a
    CPU with AVX-VNNI, and the AVX2 form to vpmaddubsw + vpmaddwd."""
    from llvmlite import binding, ir

    binding.initialize_native_target()
    binding.initialize_native_asmprinter()
    for dot, cpu, expected in [
        ("vnni", "alderlake", ["vpdpbusd"]),
        ("avx2", "haswell", ["vpmaddubsw", "vpmaddwd", "vpsignb"]),
    ]:
        module = ir.Module()
        i32x, i8x = (
            ir.VectorType(ir.IntType(32), microkernel.LANES),
            ir.VectorType(ir.IntType(8), 4 * microkernel.LANES),
        )
        fn = ir.Function(module, ir.FunctionType(i32x, [i32x, i8x, i8x, i8x]), "dot")
        builder = ir.IRBuilder(fn.append_basic_block())
        builder.ret(microkernel.DOT[dot](builder, *fn.args))
        machine = binding.Target.from_default_triple().create_target_machine(cpu=cpu, opt=2)
        asm = machine.emit_assembly(binding.parse_assembly(str(module)))
        assert all(op in asm for op in expected), asm
