"""The one matmul kernel (microkernel.py) against the NumPy dequantize-then-matmul reference, for every
weight format, 1 to 17 rows (every tile height and remainder), widths that are not multiples of 8, 32
or a panel, and the bias, GELU and residual fusions; and kernels.linear on both sides of ROWS_MAX."""

import numpy as np
import pytest
from conftest import assert_close, normal

from picogpt import formats, kernels, model
from picogpt.kernels import microkernel

rng = np.random.default_rng(11)
randn = normal(rng)


NONE = np.empty((0, 0), np.float32)


@pytest.mark.parametrize("dtype", formats.DTYPES)
@pytest.mark.parametrize("n_in,n_out", [(1, 1), (7, 13), (37, 101), (33, 64), (96, 70), (200, 129)])
def test_every_row_count_and_fusion_equals_the_reference(dtype, n_in, n_out):
    w = formats.pack(randn(n_in, n_out, scale=0.3), dtype)
    wide = formats.dequantize(w)  # the reference: widen, then matmul
    b = randn(n_out)
    plain, with_gelu = microkernel.linear_of(w, b), microkernel.linear_of(w, b, gelu=True)
    for n_rows in range(1, 18):
        x, res = randn(n_rows, n_in), randn(n_rows, n_out)
        threads = 1 + n_rows % 3
        assert_close(microkernel.linear(x, *plain, NONE, threads), model.linear(x, wide, b))
        assert_close(microkernel.linear(x, *plain, res, threads), model.linear(x, wide, b) + res)
        assert_close(microkernel.linear(x, *with_gelu, NONE, threads), model.gelu(model.linear(x, wide, b)))


@pytest.mark.parametrize("dtype", formats.DTYPES)
@pytest.mark.parametrize("n_in,n_out,n_rows", [(768, 2304, 1), (3072, 768, 8), (48, 50257, 3)])
def test_model_sized_matrices(dtype, n_in, n_out, n_rows):
    w = formats.pack(randn(n_in, n_out, scale=0.05), dtype)
    x, b = randn(n_rows, n_in), randn(n_out)
    got = microkernel.linear(x, *microkernel.linear_of(w, b), NONE, 2)
    assert_close(got, model.linear(x, formats.dequantize(w), b))


@pytest.mark.parametrize("dtype", formats.DTYPES)
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
@pytest.mark.parametrize("n_rows", [1, kernels.ROWS_MAX, kernels.ROWS_MAX + 1, 150])
def test_kernels_linear_on_both_sides_of_rows_max(dtype, n_rows):
    w = formats.pack(randn(45, 70, scale=0.3), dtype)
    x, b, res = randn(n_rows, 45), randn(70), randn(n_rows, 70)
    wide = formats.dequantize(w)
    assert_close(kernels.linear(x, microkernel.linear_of(w, b)), model.linear(x, wide, b))
    assert_close(kernels.linear(x, microkernel.linear_of(w, b), res), model.linear(x, wide, b) + res)
    assert_close(kernels.linear(x, microkernel.linear_of(w, b, gelu=True)), model.gelu(model.linear(x, wide, b)))
