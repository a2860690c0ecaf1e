"""The Numba CPU kernels (minicnn/ops/cpu.py) against the NumPy reference.

float64: every result within rtol 1e-12 of the reference (relative to the result's scale).
float32: cpu.py runs in float32 and is compared with the reference run in float64 on the same
(float32-rounded) inputs, within 1e-5 of the result's scale.
Also: preallocated outputs (pre-filled with NaN, so anything not written shows), need_dx=False,
bit-identical results between runs and between 1 and 2 threads, and argument checks.
"""
import contextlib
import os

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minicnn.ops import blas, cpu, ref
from tests.strategies import (
    FEW_EXAMPLES,
    JIT_SETTINGS,
    conv_case,
    dense_case,
    loss_case,
    normal_array,
    pool_case,
    relu_case,
    separated_array,
)

DTYPES = [np.float64, np.float32]
RTOL = {np.float64: 1e-12, np.float32: 1e-5}


def assert_close(got, expected, dtype):
    """max|got - expected| <= rtol * max(1, max|expected|), and the dtype is the input's."""
    assert got.dtype == dtype
    assert got.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    err = float(np.max(np.abs(got.astype(np.float64) - expected))) if expected.size else 0.0
    assert err <= RTOL[dtype] * scale, f"max error {err:.3g} > {RTOL[dtype]:.0e} * {scale:.3g}"


def cast(dtype, *arrays):
    """The arrays cast to dtype (what cpu.py gets) and back to float64 (what ref.py gets)."""
    low = [np.asarray(a, dtype=dtype) for a in arrays]
    return low, [a.astype(np.float64) for a in low]


def nan_like(shape, dtype):
    return np.full(shape, np.nan, dtype=dtype)


# --------------------------------------------------------------------------- conv2d
@pytest.mark.parametrize("dtype", DTYPES)
@JIT_SETTINGS
@given(case=conv_case())
def test_conv2d_matches_ref(dtype, case):
    (x, w, b, dout), (x64, w64, b64, dout64) = cast(dtype, case["x"], case["w"], case["b"], case["dout"])
    _, _, _, _, _, _, S, P = case["shape"]
    assert_close(cpu.conv2d_forward(x, w, b, S, P), ref.conv2d_forward(x64, w64, b64, S, P), dtype)
    for got, expected in zip(cpu.conv2d_backward(dout, x, w, S, P), ref.conv2d_backward(dout64, x64, w64, S, P)):
        assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW_EXAMPLES
@given(case=conv_case())
def test_conv2d_preallocated_outputs_and_need_dx(dtype, case):
    (x, w, b, dout), (x64, w64, b64, dout64) = cast(dtype, case["x"], case["w"], case["b"], case["dout"])
    _, _, _, _, _, _, S, P = case["shape"]
    out = nan_like(dout.shape, dtype)
    assert cpu.conv2d_forward(x, w, b, S, P, out=out) is out
    assert_close(out, ref.conv2d_forward(x64, w64, b64, S, P), dtype)

    dx, dw, db = nan_like(x.shape, dtype), nan_like(w.shape, dtype), nan_like(b.shape, dtype)
    got = cpu.conv2d_backward(dout, x, w, S, P, dx=dx, dw=dw, db=db)
    assert got[0] is dx and got[1] is dw and got[2] is db
    for g, e in zip(got, ref.conv2d_backward(dout64, x64, w64, S, P)):
        assert_close(g, e, dtype)

    dw2, db2 = nan_like(w.shape, dtype), nan_like(b.shape, dtype)
    none, dw2_out, db2_out = cpu.conv2d_backward(dout, x, w, S, P, dw=dw2, db=db2, need_dx=False)
    assert none is None and dw2_out is dw2 and db2_out is db2
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


def test_conv2d_large_pad_and_stride_cases():
    """Fixed corner cases: pad > K - 1 (dx crops), stride that skips input, 1x1 kernel, K = H."""
    rng = np.random.default_rng(1)
    for (N, C, H, W, F, K, S, P) in [(2, 2, 3, 4, 3, 1, 1, 2), (1, 3, 8, 7, 2, 2, 3, 0),
                                     (2, 1, 4, 4, 5, 4, 1, 0), (1, 2, 5, 5, 3, 3, 2, 2),
                                     (1, 1, 1, 1, 1, 4, 1, 2)]:
        x = rng.standard_normal((N, C, H, W))
        w = rng.standard_normal((F, C, K, K))
        b = rng.standard_normal(F)
        out = ref.conv2d_forward(x, w, b, S, P)
        dout = rng.standard_normal(out.shape)
        assert_close(cpu.conv2d_forward(x, w, b, S, P), out, np.float64)
        for g, e in zip(cpu.conv2d_backward(dout, x, w, S, P), ref.conv2d_backward(dout, x, w, S, P)):
            assert_close(g, e, np.float64)


def nan_scratch(work):
    """Fill a conv workspace's float scratch with NaN: anything a call reads before writing it shows."""
    for arr in work.values():
        if isinstance(arr, np.ndarray) and arr.dtype.kind == "f":
            arr.fill(np.nan)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW_EXAMPLES
@given(case=conv_case())
def test_conv2d_workspace_is_filled_by_forward_and_reused_by_backward(dtype, case):
    """work=: the forward fills the cols, the backward reuses them; results as without work."""
    (x, w, b, dout), (x64, w64, b64, dout64) = cast(dtype, case["x"], case["w"], case["b"], case["dout"])
    _, _, _, _, _, _, S, P = case["shape"]
    work = cpu.conv2d_workspace(x.shape, w.shape, S, P, dtype)
    nan_scratch(work)
    out = cpu.conv2d_forward(x, w, b, S, P, work=work)
    assert_close(out, ref.conv2d_forward(x64, w64, b64, S, P), dtype)
    got = cpu.conv2d_backward(dout, x, w, S, P, work=work)
    for g, e, plain in zip(got, ref.conv2d_backward(dout64, x64, w64, S, P), cpu.conv2d_backward(dout, x, w, S, P)):
        assert_close(g, e, dtype)
        np.testing.assert_array_equal(g, plain)
    with pytest.raises(ValueError):
        cpu.conv2d_forward(x[:, :, :, :-1] if x.shape[3] > 1 else np.concatenate([x, x], 3), w, b, S, P, work=work)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(48, 16, 14, 14, 32, 3, 1, 1),    # many blocks and dW chunks, parallel
                                   (41, 3, 12, 12, 8, 3, 2, 1),      # strided; 41: the last block is short
                                   (35, 1, 28, 28, 16, 3, 1, 1)])    # a first layer (C = 1), odd batch
def test_conv2d_large_batches_use_blocks_and_parallel_kernels(dtype, shape):
    """Shapes with several image blocks and dW chunks, past _CONV_PARALLEL_MIN_MACS: against the
    reference, and bit-identical with 1 and 2 threads (the blocks and chunks are fixed by the
    shapes, not the thread count)."""
    N, C, H, W, F, K, S, P = shape
    rng = np.random.default_rng(5)
    (x, w, b), (x64, w64, b64) = cast(dtype, rng.standard_normal((N, C, H, W)),
                                      rng.standard_normal((F, C, K, K)) * 0.2, rng.standard_normal(F))
    out64 = ref.conv2d_forward(x64, w64, b64, S, P)
    _, NB, _, nblocks, chunks, _ = cpu._conv_plan(N, C, H, W, F, K, S, P, np.dtype(dtype).itemsize)
    assert nblocks >= 4 and chunks >= 4
    dout = rng.standard_normal(out64.shape).astype(dtype)
    expected = [out64, *ref.conv2d_backward(dout.astype(np.float64), x64, w64, S, P)]
    assert_ref_and_thread_independent(
        lambda: [cpu.conv2d_forward(x, w, b, S, P), *cpu.conv2d_backward(dout, x, w, S, P)], expected, dtype)


def assert_ref_and_thread_independent(compute, expected, dtype):
    """compute() -> arrays, run with 1 and 2 Numba threads: close to the reference's ``expected`` and
    bit-identical between the thread counts."""
    results = []
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            results.append(compute())
    finally:
        numba.set_num_threads(before)
    for got, e in zip(results[0], expected):
        assert_close(got, e, dtype)
    for a, c in zip(results[0], results[-1]):
        np.testing.assert_array_equal(a, c)


@contextlib.contextmanager
def conv_plan(**constants):
    """Set cpu.py's blocking constants (read when a workspace is made) for the duration."""
    old = {k: getattr(cpu, k) for k in constants}
    try:
        for k, v in constants.items():
            setattr(cpu, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(cpu, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@JIT_SETTINGS
@given(case=conv_case(max_n=11, max_c=4, max_f=6, max_hw=11),
       block_bytes=st.sampled_from([1, 3000, 1 << 18]), min_blocks=st.sampled_from([1, 3]),
       chunks=st.sampled_from([1, 2, 16]), parts=st.sampled_from([0, 1 << 40]))
def test_conv2d_blockings_match_ref_and_each_other(dtype, case, block_bytes, min_blocks, chunks, parts):
    """Every blocking the plan can choose: several images per block with a short last block, one
    image per block, dW over 1, 2 or many chunks, a batch of one image split in parts (parts=0
    forces it when OH >= 2: the forward by rows, the backward into its dW and its dX, or without dX
    by groups of filters when F >= 2): against the reference, and bit-identical with 1 and 2 threads."""
    (x, w, b, dout), (x64, w64, b64, dout64) = cast(dtype, case["x"], case["w"], case["b"], case["dout"])
    N, C, H, W, F, K, S, P = case["shape"]
    with conv_plan(_BLOCK_BYTES=block_bytes, _MIN_BLOCKS=min_blocks, _DW_CHUNKS=chunks, _PARTS_MIN_MACS=parts,
                   _FILTER_PARTS_MIN_MACS=parts, _CONV_PARALLEL_MIN_MACS=0):
        work = cpu.conv2d_workspace(x.shape, w.shape, S, P, dtype)

    def scratch(arrays):                            # before each call: anything read before it is written shows
        nan_scratch(work)
        return list(arrays())

    expected = [ref.conv2d_forward(x64, w64, b64, S, P), *ref.conv2d_backward(dout64, x64, w64, S, P)]
    assert_ref_and_thread_independent(
        lambda: [*scratch(lambda: [cpu.conv2d_forward(x, w, b, S, P, work=work)]),
                 *scratch(lambda: cpu.conv2d_backward(dout, x, w, S, P, work=work)),
                 *scratch(lambda: cpu.conv2d_backward(dout, x, w, S, P, work=work, need_dx=False)[1:])],
        expected + expected[2:], dtype)


def test_conv2d_workspace_does_not_grow_with_the_batch():
    """The blocked convolution keeps no batch-sized buffer: its scratch for batch 512 is the
    scratch for batch 8 (one block per thread slot, plus the dW partial sums)."""
    def nbytes(n):
        work = cpu.conv2d_workspace((n, 32, 16, 16), (64, 32, 3, 3), 1, 1, np.float32)
        return sum(a.nbytes for a in work.values() if isinstance(a, np.ndarray))
    assert nbytes(512) == nbytes(64) <= nbytes(8) * 2
    assert nbytes(512) < 512 * 32 * 16 * 16 * 4          # less than the input itself


def test_team_keeps_the_right_address_of_each_counter():
    """The team keeps its counters' addresses (numpy's .ctypes.data is slow): each counter gets its
    own, however many come and go (the oldest of more than 8 dropped, never a stale one)."""
    team = cpu._Team()
    counters = [np.zeros(1, np.int64) for _ in range(20)]
    for rep in range(3):
        for c in counters[:3] + counters[rep * 5:rep * 5 + 10]:
            assert team._address(c) == c.ctypes.data
    assert len(team.addresses) <= 8


def test_team_runs_every_slot_and_reraises_a_workers_error():
    seen = []

    def kernel(out, s, T):
        out.append((s, T))
        if s == 1:
            raise ArithmeticError("slot 1")
    with pytest.raises(ArithmeticError):
        cpu._team.run(kernel, (seen,), 2)
    assert sorted(seen) == [(0, 2), (1, 2)]
    seen.clear()
    cpu._team.run(lambda out, s, T: out.append((s, T)), (seen,), 3)     # the team grows; no error left over
    assert sorted(seen) == [(0, 3), (1, 3), (2, 3)]


def test_conv2d_rejects_bad_arguments():
    x, w, b = np.zeros((1, 2, 5, 5)), np.zeros((3, 2, 3, 3)), np.zeros(3)
    with pytest.raises(ValueError):
        cpu.conv2d_forward(x, np.zeros((3, 1, 3, 3)), b, 1, 0)              # channel mismatch
    with pytest.raises(ValueError):
        cpu.conv2d_forward(x, w, b, 1, 0, out=np.zeros((1, 3, 5, 5)))      # wrong out shape
    with pytest.raises(ValueError):
        cpu.conv2d_forward(x, w, b, 1, 0, out=np.zeros((1, 3, 3, 3), np.float32))  # wrong out dtype
    with pytest.raises(ValueError):
        cpu.conv2d_forward(np.zeros((1, 2, 2, 2)), w, b, 1, 0)             # kernel larger than input
    with pytest.raises(ValueError):
        cpu.conv2d_forward(x, w, b, 0, 0)                                   # stride 0


# --------------------------------------------------------------------------- max-pool
@pytest.mark.parametrize("dtype", DTYPES)
@JIT_SETTINGS
@given(case=pool_case())
def test_maxpool2d_matches_ref(dtype, case):
    (x, dout), (x64, dout64) = cast(dtype, case["x"], case["dout"])
    _, _, _, _, K, S = case["shape"]
    out, argmax = cpu.maxpool2d_forward(x, K, S)
    out_ref, argmax_ref = ref.maxpool2d_forward(x64, K, S)
    assert argmax.dtype == np.int32
    np.testing.assert_array_equal(argmax, argmax_ref)
    assert_close(out, out_ref, dtype)
    assert_close(cpu.maxpool2d_backward(dout, argmax, x.shape), ref.maxpool2d_backward(dout64, argmax_ref, x.shape),
                 dtype)

    out2, argmax2, dx2 = nan_like(out.shape, dtype), np.full(out.shape, -7, np.int32), nan_like(x.shape, dtype)
    got = cpu.maxpool2d_forward(x, K, S, out=out2, argmax=argmax2)
    assert got[0] is out2 and got[1] is argmax2
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(argmax2, argmax)
    assert cpu.maxpool2d_backward(dout, argmax, x.shape, dx=dx2) is dx2
    np.testing.assert_array_equal(dx2, cpu.maxpool2d_backward(dout, argmax, x.shape))


def test_maxpool2d_ties_pick_first_in_row_major_order():
    for dtype in DTYPES:
        x = np.array([[[[1.0, 5.0, 2.0],
                        [5.0, 5.0, 0.0],
                        [3.0, 4.0, 5.0]]]], dtype=dtype)
        out, argmax = cpu.maxpool2d_forward(x, 2, 1)
        np.testing.assert_array_equal(argmax[0, 0], [[1, 1], [3, 4]])
        np.testing.assert_array_equal(argmax, ref.maxpool2d_forward(x, 2, 1)[1])
        _, argmax = cpu.maxpool2d_forward(np.zeros((2, 3, 4, 4), dtype), 2, 2)
        np.testing.assert_array_equal(argmax[1, 2], [[0, 2], [8, 10]])


# --------------------------------------------------------------------------- ReLU
@pytest.mark.parametrize("dtype", DTYPES)
@JIT_SETTINGS
@given(case=relu_case())
def test_relu_matches_ref(dtype, case):
    (x, dout), (x64, dout64) = cast(dtype, case["x"], case["dout"])
    out = cpu.relu_forward(x)
    assert_close(out, ref.relu_forward(x64), dtype)
    assert_close(cpu.relu_backward(dout, out), ref.relu_backward(dout64, ref.relu_forward(x64)), dtype)

    out2, dx2 = nan_like(x.shape, dtype), nan_like(x.shape, dtype)
    assert cpu.relu_forward(x, out=out2) is out2
    assert cpu.relu_backward(dout, out2, dx=dx2) is dx2
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(dx2, cpu.relu_backward(dout, out))


def test_relu_edge_values_follow_ref():
    x = np.array([-np.inf, -1.0, -0.0, 0.0, 2.0, np.inf, np.nan])
    np.testing.assert_array_equal(cpu.relu_forward(x), ref.relu_forward(x))            # NaN passes through
    out = cpu.relu_forward(x)
    np.testing.assert_array_equal(cpu.relu_backward(np.ones_like(x), out), ref.relu_backward(np.ones_like(x), out))


# --------------------------------------------------------------------------- dense
@pytest.mark.parametrize("dtype", DTYPES)
@JIT_SETTINGS
@given(case=dense_case())
def test_dense_matches_ref(dtype, case):
    (x, w, b, dout), (x64, w64, b64, dout64) = cast(dtype, case["x"], case["w"], case["b"], case["dout"])
    assert_close(cpu.dense_forward(x, w, b), ref.dense_forward(x64, w64, b64), dtype)
    for got, expected in zip(cpu.dense_backward(dout, x, w), ref.dense_backward(dout64, x64, w64)):
        assert_close(got, expected, dtype)

    out = nan_like(dout.shape, dtype)
    assert cpu.dense_forward(x, w, b, out=out) is out
    assert_close(out, ref.dense_forward(x64, w64, b64), dtype)
    dx, dw, db = nan_like(x.shape, dtype), nan_like(w.shape, dtype), nan_like(b.shape, dtype)
    got = cpu.dense_backward(dout, x, w, dx=dx, dw=dw, db=db)
    assert got[0] is dx and got[1] is dw and got[2] is db
    for g, e in zip(got, ref.dense_backward(dout64, x64, w64)):
        assert_close(g, e, dtype)
    none, dw2, db2 = cpu.dense_backward(dout, x, w, need_dx=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


def test_dense_long_rows():
    """D = 1568 (a 32x7x7 feature map), the size of the default network's fc layer."""
    x, w, b = normal_array(0, (5, 1568)), normal_array(1, (10, 1568)), normal_array(2, (10,))
    assert_close(cpu.dense_forward(x, w, b), ref.dense_forward(x, w, b), np.float64)
    x32, w32, b32 = (a.astype(np.float32) for a in (x, w, b))
    assert_close(cpu.dense_forward(x32, w32, b32), ref.dense_forward(*(a.astype(np.float64) for a in (x32, w32, b32))),
                 np.float32)


# --------------------------------------------------------------------------- loss
@pytest.mark.parametrize("dtype", DTYPES)
@JIT_SETTINGS
@given(case=loss_case())
def test_softmax_cross_entropy_matches_ref(dtype, case):
    (logits,), (logits64,) = cast(dtype, case["logits"])
    y = case["y"]
    loss, probs = cpu.softmax_cross_entropy_forward(logits, y)
    loss_ref, probs_ref = ref.softmax_cross_entropy_forward(logits64, y)
    assert isinstance(loss, float)
    assert abs(loss - loss_ref) <= RTOL[dtype] * max(1.0, abs(loss_ref))
    assert_close(probs, probs_ref, dtype)
    assert_close(cpu.softmax_cross_entropy_backward(probs, y), ref.softmax_cross_entropy_backward(probs_ref, y), dtype)

    probs2, dlogits2 = nan_like(probs.shape, dtype), nan_like(probs.shape, dtype)
    loss2, got = cpu.softmax_cross_entropy_forward(logits, y.astype(np.int32), probs=probs2)
    assert got is probs2 and loss2 == loss
    np.testing.assert_array_equal(probs2, probs)
    assert cpu.softmax_cross_entropy_backward(probs, y.astype(np.int32), dlogits=dlogits2) is dlogits2
    np.testing.assert_array_equal(dlogits2, cpu.softmax_cross_entropy_backward(probs, y))


def test_softmax_cross_entropy_large_logits_and_bad_labels():
    logits = np.array([[1000.0, 0.0, -1000.0], [-1000.0, -1000.0, -999.0]])
    y = np.array([0, 2])
    loss, probs = cpu.softmax_cross_entropy_forward(logits, y)
    loss_ref, probs_ref = ref.softmax_cross_entropy_forward(logits, y)
    assert np.isfinite(loss) and abs(loss - loss_ref) <= 1e-12
    assert_close(probs, probs_ref, np.float64)
    with pytest.raises(ValueError):
        cpu.softmax_cross_entropy_forward(logits, np.array([0, 3]))
    with pytest.raises(ValueError):
        cpu.softmax_cross_entropy_backward(probs, np.array([-1, 0]))


# --------------------------------------------------------------------------- determinism
def _all_ops(dtype):
    """Run every op on one medium problem; return every output array."""
    x = separated_array(0, (8, 3, 12, 12)).astype(dtype)
    w = normal_array(1, (6, 3, 3, 3), 0.5).astype(dtype)
    b = normal_array(2, (6,)).astype(dtype)
    results = []
    for S, P in [(1, 1), (2, 0)]:
        out = cpu.conv2d_forward(x, w, b, S, P)
        dout = normal_array(3, out.shape).astype(dtype)
        results += [out, *cpu.conv2d_backward(dout, x, w, S, P)]
    a = cpu.relu_forward(x)
    p, argmax = cpu.maxpool2d_forward(a, 2, 2)
    dp = cpu.maxpool2d_backward(p, argmax, a.shape)
    results += [a, p, argmax, dp, cpu.relu_backward(dp, a)]
    flat = p.reshape(8, -1)
    wd, bd = normal_array(4, (5, flat.shape[1]), 0.2).astype(dtype), normal_array(5, (5,)).astype(dtype)
    logits = cpu.dense_forward(flat, wd, bd)
    y = np.arange(8) % 5
    loss, probs = cpu.softmax_cross_entropy_forward(logits, y)
    dlogits = cpu.softmax_cross_entropy_backward(probs, y)
    results += [logits, np.array([loss]), probs, dlogits, *cpu.dense_backward(dlogits, flat, wd)]
    return results


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_are_bit_identical_across_runs_and_thread_counts(dtype):
    first = _all_ops(dtype)
    second = _all_ops(dtype)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    max_threads = numba.config.NUMBA_NUM_THREADS
    if max_threads < 2:
        pytest.skip("needs 2 Numba threads")
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _all_ops(dtype)
        numba.set_num_threads(2)
        two = _all_ops(dtype)
    finally:
        numba.set_num_threads(before)
    for a, b, c in zip(first, one, two):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES)
def test_serial_and_parallel_twins_agree_bit_for_bit(dtype):
    """Sizes past _PARALLEL_MIN run the parallel kernels (2 threads) or their serial twins
    (1 thread): same body, so the same bits; and both match the reference."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 16, 16, 16)).astype(dtype)
    assert x.size >= cpu._PARALLEL_MIN
    wd = (rng.standard_normal((300, 16 * 8 * 8)) * 0.05).astype(dtype)
    bd = rng.standard_normal(300).astype(dtype)

    def run():
        a = cpu.relu_forward(x)
        p, argmax = cpu.maxpool2d_forward(a, 2, 2)
        da = cpu.relu_backward(cpu.maxpool2d_backward(p, argmax, a.shape), a)
        flat = p.reshape(64, -1)
        out = cpu.dense_forward(flat, wd, bd)
        return [a, p, argmax, da, out, *cpu.dense_backward(out, flat, wd)]

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = run()
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    x64 = x.astype(np.float64)
    a64 = ref.relu_forward(x64)
    p64, _ = ref.maxpool2d_forward(a64, 2, 2)
    assert_close(one[1], p64, dtype)
    assert_close(one[4], ref.dense_forward(p64.reshape(64, -1), wd.astype(np.float64), bd.astype(np.float64)), dtype)


# --------------------------------------------------------------------------- fused ops
@pytest.mark.parametrize("dtype", DTYPES)
@FEW_EXAMPLES
@given(case=conv_case())
def test_conv2d_forward_with_fused_relu_matches_ref_composition(dtype, case):
    (x, w, b), (x64, w64, b64) = cast(dtype, case["x"], case["w"], case["b"])
    _, _, _, _, _, _, S, P = case["shape"]
    expected = ref.relu_forward(ref.conv2d_forward(x64, w64, b64, S, P))
    got = cpu.conv2d_forward(x, w, b, S, P, relu=True)
    assert_close(got, expected, dtype)
    np.testing.assert_array_equal(got, cpu.relu_forward(cpu.conv2d_forward(x, w, b, S, P)))


@pytest.mark.parametrize("dtype", DTYPES)
@JIT_SETTINGS
@given(case=conv_case(max_n=5, max_hw=11), window=st.integers(1, 3), stride=st.sampled_from(["k", "k+1", "k-1"]),
       relu=st.booleans(), parts=st.sampled_from([0, 1 << 40]))
def test_conv2d_with_fused_maxpool_matches_ref_and_the_unfused_ops(dtype, case, window, stride, relu, parts):
    """conv2d_forward(pool=(k, s)) -> (out, pool_out, argmax) and conv2d_backward(pool=...) of the
    pooled gradient: against the reference composition (conv, relu, maxpool2d and their backwards),
    and bit for bit against cpu's own unfused ops; windows that do not overlap (k <= s: pooled in
    the conv's blocks) and that do (k > s: a second pass). A single image split in parts (parts=0)
    splits its rows at multiples of s when pooling, so its products have other shapes than the
    unfused ops' and may differ from them in the last bits: compared with the reference only."""
    (x, w, b), (x64, w64, b64) = cast(dtype, case["x"], case["w"], case["b"])
    N, C, H, W, F, K, S, P = case["shape"]
    OH, OW = (H + 2 * P - K) // S + 1, (W + 2 * P - K) // S + 1
    k = min(window, OH, OW)
    s = {"k": k, "k+1": k + 1, "k-1": max(1, k - 1)}[stride]
    out64 = ref.conv2d_forward(x64, w64, b64, S, P, relu=relu)
    pooled64, argmax64 = ref.maxpool2d_forward(out64, k, s)
    dpool = normal_array(7, pooled64.shape).astype(dtype)
    dconv64 = ref.maxpool2d_backward(dpool.astype(np.float64), argmax64, out64.shape,
                                     relu_pooled=pooled64 if relu else None)
    expected = [out64, pooled64, *ref.conv2d_backward(dconv64, x64, w64, S, P)]
    with conv_plan(_PARTS_MIN_MACS=parts, _CONV_PARALLEL_MIN_MACS=0):
        work = cpu.conv2d_workspace(x.shape, w.shape, S, P, dtype)
    out, pooled, argmax = cpu.conv2d_forward(x, w, b, S, P, relu=relu, pool=(k, s), work=work)
    grads = cpu.conv2d_backward(dpool, x, w, S, P, pool=(k, s), argmax=argmax, relu_pooled=pooled if relu else None,
                                work=work)
    for got, e in zip([out, pooled, *grads], expected):
        assert_close(got, e, dtype)
    if dtype == np.float64:
        np.testing.assert_array_equal(argmax, argmax64)
    plain = cpu.conv2d_forward(x, w, b, S, P, relu=relu, work=work)
    plain_pooled, plain_argmax = cpu.maxpool2d_forward(plain, k, s)
    dconv = cpu.maxpool2d_backward(dpool, plain_argmax, plain.shape, relu_pooled=plain_pooled if relu else None)
    plain_grads = cpu.conv2d_backward(dconv, x, w, S, P, work=work)
    if work["plan"][-1] == 1:
        for a, c in zip([out, pooled, argmax, *grads], [plain, plain_pooled, plain_argmax, *plain_grads]):
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES)
@JIT_SETTINGS
@given(case=conv_case(max_n=1, max_f=7, max_hw=11), pool=st.booleans(), relu=st.booleans())
def test_conv2d_one_image_backward_without_dx_by_groups_of_filters(dtype, case, pool, relu):
    """A first layer's backward of one image (no dX), split into groups of filters (forced, any F
    >= 2, odd ones too), with or without the fused max-pool (2x2 when it fits) and ReLU mask: dW and
    db against the reference, every filter's rows written (the scratch starts as NaN), the same bits
    with 1 and 2 threads."""
    (x, w, b), (x64, w64, b64) = cast(dtype, case["x"], case["w"], case["b"])
    N, C, H, W, F, K, S, P = case["shape"]
    OH, OW = (H + 2 * P - K) // S + 1, (W + 2 * P - K) // S + 1
    k = 2 if pool and min(OH, OW) >= 2 else 0
    with conv_plan(_FILTER_PARTS_MIN_MACS=0):
        work = cpu.conv2d_workspace(x.shape, w.shape, S, P, dtype)
    assert work["filter parts"] == (2 if F >= 2 else 1)
    out64 = ref.conv2d_forward(x64, w64, b64, S, P, relu=relu)
    if k:
        pooled64, argmax64 = ref.maxpool2d_forward(out64, k, k)
        dpool = normal_array(7, pooled64.shape).astype(dtype)
        dconv64 = ref.maxpool2d_backward(dpool.astype(np.float64), argmax64, out64.shape,
                                         relu_pooled=pooled64 if relu else None)
        _, pooled, argmax = cpu.conv2d_forward(x, w, b, S, P, relu=relu, pool=(k, k))
    else:
        dconv64 = normal_array(7, out64.shape)
        dpool = dconv64.astype(dtype)
    expected = ref.conv2d_backward(dconv64, x64, w64, S, P)[1:]

    def grads():
        nan_scratch(work)
        kw = dict(pool=(k, k), argmax=argmax, relu_pooled=pooled if relu else None) if k else {}
        return cpu.conv2d_backward(dpool, x, w, S, P, need_dx=False, work=work, **kw)[1:]
    assert_ref_and_thread_independent(grads, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@JIT_SETTINGS
@given(case=pool_case())
def test_maxpool2d_backward_with_fused_relu_matches_ref_composition(dtype, case):
    """relu -> maxpool backward in one pass == ref.relu_backward(ref.maxpool2d_backward(...))."""
    k, s = case["shape"][4:]
    (x, dout), _ = cast(dtype, case["x"], case["dout"])
    a = cpu.relu_forward(x)                          # some windows are all ReLU zeros (ties at 0)
    pooled, argmax = cpu.maxpool2d_forward(a, k, s)
    a64 = a.astype(np.float64)
    _, am64 = ref.maxpool2d_forward(a64, k, s)
    expected = ref.relu_backward(ref.maxpool2d_backward(dout.astype(np.float64), am64, a.shape), a64)
    got = cpu.maxpool2d_backward(dout, argmax, a.shape, relu_pooled=pooled)
    assert_close(got, expected, dtype)
    np.testing.assert_array_equal(got, cpu.relu_backward(cpu.maxpool2d_backward(dout, argmax, a.shape), a))


@pytest.mark.parametrize("stride,pool", [(1, (2, 2)), (2, None), (1, (3, 2))])
def test_conv_calls_with_the_same_buffers_reuse_their_checked_arguments(stride, pool):
    """A layer's calls with the same weights, outputs and workspace run on the arguments kept from
    the first one (cpu._kept_call): new input and gradient arrays each call (a new batch), weights
    changed in place, and every result as a call without a workspace computes it; another output
    buffer or an input of another shape is not taken for the kept call."""
    import gc
    import weakref
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    work = cpu.conv2d_workspace((2, 3, 9, 9), w.shape, stride, 1, np.float32)
    OH = (9 + 2 - 3) // stride + 1
    out = np.empty((2, 4, OH, OH), np.float32)
    PH = (OH - pool[0]) // pool[1] + 1 if pool else OH
    po, am = (np.empty((2, 4, PH, PH), np.float32), np.empty((2, 4, PH, PH), np.int32)) if pool else (None, None)
    dx, dw, db = np.empty((2, 3, 9, 9), np.float32), np.empty_like(w), np.empty_like(b)
    for _ in range(3):
        x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
        got = cpu.conv2d_forward(x, w, b, stride, 1, out=out, work=work, relu=True, pool=pool, pool_out=po, argmax=am)
        want = cpu.conv2d_forward(x, w, b, stride, 1, relu=True, pool=pool)
        for g, v in zip(got if pool else [got], want if pool else [want]):
            np.testing.assert_array_equal(g, v)
        dout = rng.standard_normal((2, 4, PH, PH)).astype(np.float32)
        kw = dict(pool=pool, argmax=am, relu_pooled=po) if pool else {}
        got = cpu.conv2d_backward(dout, x, w, stride, 1, dx=dx, dw=dw, db=db, work=work, **kw)
        want = cpu.conv2d_backward(dout, x, w, stride, 1, **kw)
        assert got[0] is dx and got[1] is dw and got[2] is db
        for g, v in zip(got, want):
            np.testing.assert_array_equal(g, v)
        w *= 1.5                               # in place: the kept calls see it
    assert "call forward" in work
    assert ("call backward" in work) == (pool != (3, 2))     # overlapping windows: their own backward pass
    gone = weakref.ref(x)
    del x, got, want
    gc.collect()
    assert gone() is None                      # the workspace keeps no batch alive
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    out2 = np.full_like(out, np.nan)
    got = cpu.conv2d_forward(x, w, b, stride, 1, out=out2, work=work, relu=True, pool=pool, pool_out=po, argmax=am)
    assert (got[0] if pool else got) is out2 and not np.isnan(out2).any()
    with pytest.raises(ValueError, match="work was made for"):
        cpu.conv2d_forward(x[:1], w, b, stride, 1, out=out2[:1], work=work, relu=True, pool=pool,
                           pool_out=None if po is None else po[:1], argmax=None if am is None else am[:1])


# --------------------------------------------------------------------------- SGD
@pytest.mark.parametrize("dtype", DTYPES)
@JIT_SETTINGS
@given(sizes=st.lists(st.integers(0, 70), min_size=1, max_size=3), momentum=st.sampled_from([0.0, 0.9, 0.5]),
       weight_decay=st.sampled_from([0.0, 0.01, 0.3]), dampening=st.sampled_from([0.0, 0.3]),
       nesterov=st.booleans(), lr=st.sampled_from([0.1, 1e-3, 0.37]), seed=st.integers(0, 2**31 - 1))
def test_sgd_update_is_bit_identical_to_ref(dtype, sizes, momentum, weight_decay, dampening, nesterov, lr, seed):
    """cpu.sgd_update (one Numba pass per array) gives ref.sgd_update's NumPy numbers bit for bit,
    parameters and momentum buffers, over steps (the first one included), for every option."""
    nesterov = nesterov and momentum > 0 and dampening == 0
    rng = np.random.default_rng(seed)
    params = [[rng.standard_normal(n).astype(dtype) for n in sizes] for _ in range(2)]
    params[1] = [p.copy() for p in params[0]]
    bufs = [[np.empty_like(p) for p in ps] for ps in params] if momentum else [None, None]
    for step in range(3):
        grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
        for backend, ps, bs in ((cpu, params[0], bufs[0]), (ref, params[1], bufs[1])):
            backend.sgd_update(ps, grads, bs, lr, momentum, weight_decay, dampening, nesterov, step == 0, work={})
        for a, b in zip(params[0], params[1]):
            np.testing.assert_array_equal(a, b)
        if momentum:
            for a, b in zip(bufs[0], bufs[1]):
                np.testing.assert_array_equal(a, b)


def test_sgd_update_takes_refs_passes_for_arrays_the_kernel_does_not_take():
    """Strided, mixed-dtype and 2-D arrays are updated in place too (the NumPy passes)."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((6, 8))
    cases = [(base[:, ::2].copy(order="F"), rng.standard_normal((6, 4))),      # F-ordered
             (base.copy()[::2], rng.standard_normal((3, 8))),                    # a strided view
             (base.astype(np.float32), rng.standard_normal((6, 8)))]             # float64 gradient
    for p, g in cases:
        want = p.copy()
        ref.sgd_update([want], [g], None, 0.1, 0.0, 0.01, 0.0, False, True)
        cpu.sgd_update([p], [g], None, 0.1, 0.0, 0.01, 0.0, False, True)
        np.testing.assert_array_equal(p, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_segment_dots_against_reference(dtype):
    """The trace's per-layer dot products: float64 accumulation from float32 or float64 vectors,
    segments of uneven length incl. an empty one."""
    rng = np.random.default_rng(11)
    a, b = (rng.standard_normal(1000).astype(dtype) for _ in range(2))
    bounds = np.array([0, 7, 7, 600, 1000])
    got = cpu.segment_dots([(a, b), (b, b)], bounds)
    want = ref.segment_dots([(a, b), (b, b)], bounds)
    assert got.dtype == np.float64 and got.shape == (2, 4)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@JIT_SETTINGS
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5), seed=st.integers(0, 2**31 - 1))
def test_segment_gram4_is_every_pair_of_segment_dots(sizes, seed):
    """minicnn.torch.StepVectors' one-pass Gram matrices: the same numbers as ref.segment_dots over
    each pair of the four rows (segments of any length, empty ones included), symmetric."""
    rows = np.random.default_rng(seed).standard_normal((4, sum(sizes)))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    got = cpu.segment_gram4(rows, bounds)
    assert got.shape == (len(sizes), 4, 4)
    for i in range(4):
        for j in range(4):
            want = ref.segment_dots([(rows[i], rows[j])], bounds)[0]
            np.testing.assert_allclose(got[:, i, j], want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="rows must be"):
        cpu.segment_gram4(rows[:3], bounds)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@JIT_SETTINGS
@given(n=st.integers(1, 40), classes=st.integers(1, 12), scale=st.sampled_from([0.0, 1.0, 30.0, 1e4]),
       seed=st.integers(0, 2**31 - 1))
def test_logit_stats_from_logits_matches_ref(dtype, n, classes, scale, seed):
    """The Recorder's one-kernel logit statistics: ref.logit_stats of the same logits (its softmax
    computed in float64), ties predicting the first class, and without labels no batch_acc."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, classes)) * scale).round(1).astype(dtype)      # rounding makes ties
    y = rng.integers(0, classes, n)
    z64 = z.astype(np.float64)
    e = np.exp(z64 - z64.max(axis=1, keepdims=True))
    want = ref.logit_stats(z64, e / e.sum(axis=1, keepdims=True), y)
    got = cpu.logit_stats_from_logits(z, y)
    assert set(got) == set(want)
    for k in ("logit_max", "top_class_share", "batch_acc"):
        assert got[k] == want[k], k
    assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-12, abs=1e-12)
    assert "batch_acc" not in cpu.logit_stats_from_logits(z)


def test_threads_option_keeps_the_workqueue_threading_layer():
    """train's --threads calls numba.set_num_threads, which launches Numba's threading layer: it must
    launch the layer minicnn.ops.cpu picks (workqueue), not Numba's default (OpenMP, whose spinning
    threads slowed B at batch 32 from ~23 to ~31 ms a step when minicnn's kernels used prange; they
    run on minicnn's own thread team now, but a user's prange code would still pay)."""
    import subprocess
    import sys
    code = ("from minicnn.config import set_threads; set_threads(2)\n"
            "import numba, numpy as np\n"
            "from minicnn.ops import cpu\n"
            "@numba.njit(parallel=True)\n"
            "def f(x):\n"
            "    for i in numba.prange(x.size):\n"
            "        x[i] = 1\n"
            "f(np.zeros(4))\n"
            "print(numba.threading_layer())\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "workqueue"


def test_blas_runs_at_one_thread_inside_the_ops_and_the_setting_is_restored():
    """The conv and dense ops call SciPy's OpenBLAS from inside Numba kernels with its thread count
    at 1 (minicnn's own threads split the work), and leave the caller's setting as it was."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x, w, b = np.ones((2, 3, 6, 6), np.float32), np.ones((4, 3, 3, 3), np.float32), np.zeros(4, np.float32)
    cpu.conv2d_forward(x, w, b, 1, 1)                      # loads everything
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = [d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
        seen = []
        for get, _ in blas.find_blas_threads(cpu._one_thread_blas.paths):
            with cpu._one_thread_blas:
                seen.append(get())
        out = cpu.conv2d_forward(x, w, b, 1, 1)
        cpu.conv2d_backward(out, x, w, 1, 1)
        cpu.dense_backward(np.ones((2, 5), np.float32), np.ones((2, 7), np.float32), np.ones((5, 7), np.float32))
        after = [d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
    assert seen and all(n == 1 for n in seen)
    assert after == before


def test_blas_scopes_nest_and_only_the_outermost_sets_and_restores():
    """The Network's pass scope (cpu.pass_scope) around the ops: BLAS at one thread for the whole
    pass, the ops' own blocks inside it change nothing, and leaving it (also by an error) restores
    the caller's setting. Read with the thread getter itself (threadpoolctl is optional)."""
    x, w, b = np.ones((2, 3, 6, 6), np.float32), np.ones((4, 3, 3, 3), np.float32), np.zeros(4, np.float32)
    cpu.conv2d_forward(x, w, b, 1, 1)                      # loads everything
    libs = blas.find_blas_threads(cpu._one_thread_blas.paths)
    if not libs:
        pytest.skip("no OpenBLAS thread setter found")
    get, put = libs[0]
    old = get()
    try:
        put(2)
        if get() != 2:
            pytest.skip("this OpenBLAS does not take 2 threads")
        with cpu.pass_scope():
            assert get() == 1
            out = cpu.conv2d_forward(x, w, b, 1, 1)
            cpu.conv2d_backward(out, x, w, 1, 1)
            assert get() == 1                              # the ops' blocks did not restore inside
        assert get() == 2
        with pytest.raises(ZeroDivisionError):
            with cpu.pass_scope():
                with cpu.pass_scope():
                    raise ZeroDivisionError
        assert get() == 2 and cpu._one_thread_blas.depth == 0
    finally:
        put(old)


@pytest.mark.parametrize("T", [2, 3])
def test_team_workers_wait_spinning_then_sleeping_and_every_unit_runs_once(T):
    """Workers wait for the next job in a nogil loop, then on their lock; the caller waits for them
    the same way. Jobs that outlast the spin (the lock path), calls after the workers fell asleep,
    back-to-back calls, and slots sharing an int64 counter the workers watch: every unit runs
    exactly once and every call returns."""
    import threading
    import time
    lock = threading.Lock()

    def kernel(counter, done, n, shared, slow, s, T):
        if not shared:                              # a share fixed by the slot
            for u in range(s, n, T):
                if slow and s > 0:
                    time.sleep(0.003)               # longer than the spin (1 ms)
                done.append(u)
            return
        while True:
            with lock:
                u = int(counter[0])
                counter[0] += 1
            if u >= n:
                return
            done.append(u)

    team = cpu._Team()
    for i in range(120):
        counter, done, shared = np.zeros(1, np.int64), [], i % 4 != 0
        team.run(kernel, (counter, done, 6, shared, i % 8 == 0), T, shared=shared, counter=counter)
        assert sorted(done) == list(range(6))
        if i % 15 == 7:
            time.sleep(0.003)                       # the workers go to sleep on their locks
    assert all(w.ctl[1] <= w.posted for w in team.workers)


def test_team_shared_work_is_done_once_and_withdrawn_jobs_leave_the_team_consistent():
    """With shared=True the caller takes back jobs no worker has picked up yet (its own slot took
    the units); over many calls, alternating with ordinary ones, every unit runs exactly once and
    every call returns (no lost or stale hand-off)."""
    import threading
    lock = threading.Lock()

    def kernel(counter, done, n, s, T):
        while True:
            with lock:
                u = counter[0]
                counter[0] += 1
            if u >= n:
                return
            done.append(u)

    for i in range(300):
        counter, done = [0], []
        cpu._team.run(kernel, (counter, done, 5), 2, shared=i % 3 != 0)
        assert sorted(done) == list(range(5))


AHEAD_CODE = """
import json, numpy as np
from minicnn.ops import cpu
from minicnn.network import Network
cpu.cores = lambda: 2                       # the child is started on any machine
started, command = [], cpu._ahead_command
cpu._ahead_command = lambda *a: started.append(a) or command(*a)
net = Network.from_spec("conv4k3-relu-maxpool2-fc10", (1, 8, 8), seed=0, device="cpu")
x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
loss, grads = net.loss_and_grads(x, np.array([0, 1, 2]))
s = cpu._conv_backward_wide.stats
print(json.dumps({"started": started, "hits": len(s.cache_hits), "misses": len(s.cache_misses), "loss": loss,
                  "grads": [g.tolist() for g in grads]}))
"""


def test_a_cold_cache_compiles_the_conv_backward_in_a_child_the_first_backward_loads_it(tmp_path):
    """compile_ahead: with an empty Numba cache, the first loss starts a child that compiles the conv
    backward kernel into the cache, and the first backward loads it from there (a cache hit, no
    compile here) with exactly the gradients of a normally compiled kernel; with the cache warm no
    child starts."""
    import json
    import subprocess
    import sys

    from minicnn.network import Network
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", AHEAD_CODE], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["started"] == [["float32", [1]]] and warm["started"] == []
    assert (cold["hits"], cold["misses"]) == (1, 0) and (warm["hits"], warm["misses"]) == (1, 0)
    net = Network.from_spec("conv4k3-relu-maxpool2-fc10", (1, 8, 8), seed=0, device="cpu")
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    loss, grads = net.loss_and_grads(x, np.array([0, 1, 2]))
    for run in runs:
        assert run["loss"] == loss
        for g, h in zip(grads, run["grads"]):
            np.testing.assert_array_equal(g, np.array(h, np.float32))


@pytest.mark.parametrize("child", ["import sys; sys.exit(3)", "import time; time.sleep(120)"])
def test_a_failed_or_stuck_compile_ahead_child_costs_nothing_but_time(monkeypatch, child):
    """A child that fails, or does not finish within _AHEAD_TIMEOUT_S (killed), leaves the backward
    to compile here as without it: the same results, no child left running."""
    import subprocess
    import sys
    import time

    from minicnn.network import Network
    procs = []
    popen = subprocess.Popen
    monkeypatch.setattr(cpu, "_ahead_keys", set())
    monkeypatch.setattr(cpu, "cores", lambda: 2)
    monkeypatch.setattr(cpu, "_cache_missed", lambda dt: True)
    monkeypatch.setattr(cpu, "_AHEAD_TIMEOUT_S", 1.0)
    monkeypatch.setattr(cpu, "_ahead_command", lambda *a: [sys.executable, "-c", child])
    monkeypatch.setattr(cpu.subprocess, "Popen", lambda *a, **k: procs.append(popen(*a, **k)) or procs[-1])
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    y = np.array([3, 4])
    expected = Network.from_spec("conv4k3-relu-maxpool2-fc10", (1, 8, 8), seed=0, device="numpy").loss_and_grads(x, y)
    net = Network.from_spec("conv4k3-relu-maxpool2-fc10", (1, 8, 8), seed=0, device="cpu")
    t = time.perf_counter()
    loss, grads = net.loss_and_grads(x, y)
    assert time.perf_counter() - t < 60
    assert len(procs) == 1 and procs[0].poll() is not None and cpu._ahead == []
    np.testing.assert_allclose(loss, expected[0], rtol=1e-5)
    for g, e in zip(grads, expected[1]):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
