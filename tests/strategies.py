"""Hypothesis strategies for honest op inputs: small shapes, and values away from kinks and ties.

"Honest" means the finite-difference gradient is the true gradient: no ReLU input within reach
of 0 and no two candidates of a max-pool window within reach of each other, for a perturbation
of eps = 1e-6. Tolerances stay tight; the inputs are made honest instead.

Arrays are built by NumPy from a drawn seed (Hypothesis shrinks the shapes; the values are a
function of the seed), in float64; tests cast to float32 where they need it.
"""
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Shared settings for every test that may JIT-compile on its first example.
JIT_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW_EXAMPLES = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def conv_shapes(draw, max_n=3, max_c=3, max_f=4, max_hw=9, max_k=4, max_stride=3, max_pad=2):
    """(N, C, H, W, F, K, S, P) with output size OH, OW >= 1."""
    K = draw(st.integers(1, max_k))
    P = draw(st.integers(0, max_pad))
    min_hw = max(1, K - 2 * P)                    # (H + 2P - K) // S + 1 >= 1  <=>  H >= K - 2P
    H = draw(st.integers(min_hw, max(min_hw, max_hw)))
    W = draw(st.integers(min_hw, max(min_hw, max_hw)))
    N = draw(st.integers(1, max_n))
    C = draw(st.integers(1, max_c))
    F = draw(st.integers(1, max_f))
    S = draw(st.integers(1, max_stride))
    return N, C, H, W, F, K, S, P


@st.composite
def pool_shapes(draw, max_n=3, max_c=3, max_hw=9, max_k=4, max_stride=3):
    """(N, C, H, W, K, S) with output size OH, OW >= 1 (no padding in max-pool)."""
    K = draw(st.integers(1, max_k))
    H = draw(st.integers(K, max(K, max_hw)))
    W = draw(st.integers(K, max(K, max_hw)))
    N = draw(st.integers(1, max_n))
    C = draw(st.integers(1, max_c))
    S = draw(st.integers(1, max_stride))
    return N, C, H, W, K, S


@st.composite
def dense_shapes(draw, max_n=4, max_d=40, max_o=6):
    """(N, D, O); D reaches past 32 so the lane-blocked dot products of cpu.py see a tail."""
    return draw(st.integers(1, max_n)), draw(st.integers(1, max_d)), draw(st.integers(1, max_o))


def separated_array(seed, shape):
    """Float64 array of distinct values in +-[0.5, 1.5), any two at least 1/size apart.

    Magnitudes are 0.5 + k/size for a random permutation k of 0..size-1, with random signs:
    no value is near the ReLU kink at 0, and no two values of a max-pool window are near a tie.
    """
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    magnitude = 0.5 + rng.permutation(size) / max(size, 1)
    sign = rng.choice([-1.0, 1.0], size=size)
    return (sign * magnitude).reshape(shape)


def normal_array(seed, shape, scale=1.0):
    """Float64 standard-normal values (weights, biases, upstream gradients, logits)."""
    return scale * np.random.default_rng(seed).standard_normal(shape)


def labels(seed, n, num_classes):
    """Int64 class labels in 0..num_classes-1."""
    return np.random.default_rng(seed).integers(0, num_classes, size=n, dtype=np.int64)


@st.composite
def conv_case(draw, **shape_kw):
    """A conv problem: shape tuple and float64 x, w, b, dout."""
    N, C, H, W, F, K, S, P = shape = draw(conv_shapes(**shape_kw))
    OH, OW = (H + 2 * P - K) // S + 1, (W + 2 * P - K) // S + 1
    seed = draw(seeds)
    return dict(
        shape=shape,
        x=normal_array(seed, (N, C, H, W)),
        w=normal_array(seed + 1, (F, C, K, K), scale=0.5),
        b=normal_array(seed + 2, (F,)),
        dout=normal_array(seed + 3, (N, F, OH, OW)),
    )


@st.composite
def pool_case(draw, **shape_kw):
    """A max-pool problem: shape tuple, float64 x without near-ties, dout."""
    N, C, H, W, K, S = shape = draw(pool_shapes(**shape_kw))
    OH, OW = (H - K) // S + 1, (W - K) // S + 1
    seed = draw(seeds)
    return dict(shape=shape, x=separated_array(seed, (N, C, H, W)), dout=normal_array(seed + 1, (N, C, OH, OW)))


@st.composite
def relu_case(draw):
    """A ReLU problem: any 1-4 dimensional shape, x away from 0, dout."""
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    seed = draw(seeds)
    return dict(x=separated_array(seed, shape), dout=normal_array(seed + 1, shape))


@st.composite
def dense_case(draw, **shape_kw):
    """A dense problem: float64 x, w, b, dout."""
    N, D, O = draw(dense_shapes(**shape_kw))
    seed = draw(seeds)
    return dict(
        x=normal_array(seed, (N, D)),
        w=normal_array(seed + 1, (O, D), scale=0.5),
        b=normal_array(seed + 2, (O,)),
        dout=normal_array(seed + 3, (N, O)),
    )


@st.composite
def loss_case(draw, max_n=5, max_classes=12):
    """A softmax cross-entropy problem: float64 logits (N, L) and int64 labels (N,)."""
    N = draw(st.integers(1, max_n))
    L = draw(st.integers(1, max_classes))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    seed = draw(seeds)
    return dict(logits=normal_array(seed, (N, L), scale=scale), y=labels(seed + 1, N, L))
