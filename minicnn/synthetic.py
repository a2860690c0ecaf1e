"""The built-in dataset: "shapes and strokes", generated procedurally (nothing to download).

``make_shapes(n, seed)`` draws ``n`` grayscale images (background 0, ink 1) of ten classes:

    0 ring        circle outline
    1 disc        filled circle
    2 square      square outline
    3 block       filled square
    4 triangle    upward equilateral triangle outline
    5 plus        "+": a horizontal and a vertical stroke crossing at the centre
    6 cross       "x": the plus turned by 45 degrees
    7 bars        "=": two parallel horizontal strokes
    8 tee         "T": a horizontal stroke on top of a vertical one
    9 corner      "L": a vertical stroke with a horizontal foot to the right

Every image is randomised independently:

* position: the centre is jittered uniformly over the whole range that keeps the shape
  (mostly) inside the image;
* scale: the shape radius is 0.45x-1.0x of ``0.32 * size`` (about 4-9 px at 28x28);
* rotation: within +-45 degrees for the square shapes (a square looks the same turned by 90),
  within +-25 degrees for the shapes with an orientation (triangle, plus, cross, bars, tee,
  corner), so that e.g. a plus never turns into a cross and every label stays well-defined;
  circles are not rotated (they are rotation invariant);
* stroke thickness: 1.5-3 px for outlines and strokes;
* intensity: the ink level is 0.6-1.0;
* clutter: a short faint stray stroke (intensity 0.2-0.45) somewhere in the image;
* noise: additive Gaussian pixel noise with standard deviation ``noise``; the result is
  clipped to [0, 1].

Rendering is vectorised over all images of a class: each shape is a signed (or unsigned)
distance function evaluated on the pixel grid in the shape's own rotated frame, turned into
ink with a one-pixel anti-aliased edge.

Determinism: all randomness comes from one ``numpy.random.Generator(PCG64(seed))`` and the
image arithmetic uses only +, -, *, /, sqrt, abs, min/max and clip (correctly rounded IEEE
operations, no transcendental functions, no BLAS, no reductions), so the same arguments give
bit-identical arrays on every machine. Rotations use the rational parametrisation
cos = (1 - t^2) / (1 + t^2), sin = 2t / (1 + t^2) with t = tan(angle / 2) drawn uniformly.
"""
import math
import numbers

import numpy as np

from .errors import DataError

CLASS_NAMES = ("ring", "disc", "square", "block", "triangle", "plus", "cross", "bars", "tee", "corner")

_F = np.float32
_BASE_RADIUS = 0.32             # shape radius at scale 1, as a fraction of the image size
_SCALE = (0.45, 1.0)
_THICKNESS = (1.5, 3.0)
_INK = (0.6, 1.0)
_CLUTTER_INK = (0.2, 0.45)
_CLUTTER_SCALE = (0.15, 0.35)
_CLUTTER_THICKNESS = (1.0, 2.0)
_MIN_SIZE = 8
_SQRT3 = math.sqrt(3.0)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


# ---------------------------------------------------------------- distance helpers
# All take local coordinates u (right), v (down) of shape (m, H, W) and per-image parameters of
# shape (m, 1, 1) (or plain numbers). Strokes are unions of segments: the helpers return
# *squared* distances, np.minimum combines them, and one sqrt at the end gives the distance
# (sqrt is monotonic, so this equals the minimum of the distances exactly).
# Edges are anti-aliased over one pixel: ink = clip(t/2 + 1/2 - distance, 0, 1).

def _sq(a, b):
    """a * a + b * b (a, b broadcastable)."""
    out = a * a
    out += b * b
    return out


def _sq_into(a, b):
    """a * a + b * b, overwriting a (a temporary of full shape)."""
    a *= a
    a += b * b
    return a


def _hseg2(u, v, half, y0=None, xc=None):
    """Squared distance to the horizontal segment from (xc - half, y0) to (xc + half, y0)."""
    du = np.abs(u if xc is None else u - xc)
    du -= half
    np.maximum(du, 0, out=du)
    return _sq_into(du, v if y0 is None else v - y0)


def _vseg2(u, v, half, x0=None, yc=None):
    """Squared distance to the vertical segment from (x0, yc - half) to (x0, yc + half)."""
    return _hseg2(v, u, half, x0, yc)


def _seg2(u, v, ax, ay, bx, by):
    """Squared distance to the segment a-b (endpoints of shape (m, 1, 1))."""
    pu, pv = u - ax, v - ay
    eu, ev = bx - ax, by - ay
    h = pu * eu
    h += pv * ev
    h *= 1 / (eu * eu + ev * ev)
    np.clip(h, 0, 1, out=h)
    pu -= eu * h
    pv -= ev * h
    return _sq_into(pu, pv)


def _box(u, v, half):
    """Signed distance to the axis-aligned square of half-side `half`."""
    qu, qv = np.abs(u), np.abs(v)
    qu -= half
    qv -= half
    inside = np.maximum(qu, qv)
    np.minimum(inside, 0, out=inside)
    np.maximum(qu, 0, out=qu)
    np.maximum(qv, 0, out=qv)
    out = np.sqrt(_sq_into(qu, qv), out=qu)
    out += inside
    return out


def _stroke(dist, t):
    """Ink of a stroke of thickness t along the zero set of dist (modified in place)."""
    np.abs(dist, out=dist)
    np.subtract(t * 0.5 + 0.5, dist, out=dist)
    return np.clip(dist, 0, 1, out=dist)


def _stroke2(dist2, t):
    """Ink of a stroke of thickness t, from a squared distance (modified in place)."""
    return _stroke(np.sqrt(dist2, out=dist2), t)


def _fill(sdf):
    """Ink of the inside of a signed distance function (modified in place)."""
    np.subtract(0.5, sdf, out=sdf)
    return np.clip(sdf, 0, 1, out=sdf)


# ---------------------------------------------------------------- the ten shapes
# Each takes (u, v, r, t): local coordinates, radius, thickness; returns ink in [0, 1].

def _ring(u, v, r, t):
    d = np.sqrt(_sq(u, v))
    d -= r
    return _stroke(d, t)


def _disc(u, v, r, t):
    d = np.sqrt(_sq(u, v))
    d -= r
    return _fill(d)


def _square(u, v, r, t):
    return _stroke(_box(u, v, r * 0.8), t)


def _block(u, v, r, t):
    return _fill(_box(u, v, r * 0.8))


def _triangle(u, v, r, t):
    # equilateral, apex up, circumradius r, centroid at the origin
    top, base, half = -r, r * 0.5, r * (_SQRT3 / 2)
    d2 = np.minimum(_seg2(u, v, 0, top, -half, base), _seg2(u, v, 0, top, half, base))
    return _stroke2(np.minimum(d2, _hseg2(u, v, half, base), out=d2), t)


def _plus(u, v, r, t):
    return _stroke2(np.minimum(_hseg2(u, v, r), _vseg2(u, v, r)), t)


def _cross(u, v, r, t):
    a = u + v
    a *= _INV_SQRT2
    b = v - u
    b *= _INV_SQRT2
    return _plus(a, b, r, t)


def _bars(u, v, r, t):
    return _stroke2(np.minimum(_hseg2(u, v, r, -0.45 * r), _hseg2(u, v, r, 0.45 * r)), t)


def _tee(u, v, r, t):
    top = -0.85 * r
    stem = _vseg2(u, v, (r - top) * 0.5, None, (r + top) * 0.5)
    return _stroke2(np.minimum(_hseg2(u, v, 0.85 * r, top), stem), t)


def _corner(u, v, r, t):
    x0, right = -0.5 * r, 0.9 * r
    foot = _hseg2(u, v, (right - x0) * 0.5, r, (right + x0) * 0.5)
    return _stroke2(np.minimum(_vseg2(u, v, r, x0), foot), t)


# Rotation ranges as t = tan(max angle / 2), written out as literals (math.tan could differ in
# the last bit between platforms): 45 degrees -> sqrt(2) - 1, 25 degrees -> tan(12.5 degrees).
_TAN_45 = math.sqrt(2.0) - 1.0
_TAN_25 = 0.22169466264293988

# (function, rotation range as tan(max angle / 2), how far the shape reaches from its centre in r)
_SHAPES = (
    (_ring, 0.0, 1.0),
    (_disc, 0.0, 1.0),
    (_square, _TAN_45, 0.8 * math.sqrt(2.0)),
    (_block, _TAN_45, 0.8 * math.sqrt(2.0)),
    (_triangle, _TAN_25, 1.0),
    (_plus, _TAN_25, 1.0),
    (_cross, _TAN_25, 1.0),
    (_bars, _TAN_25, 1.0),
    (_tee, _TAN_25, 1.15),
    (_corner, _TAN_25, 1.2),
)
assert len(_SHAPES) == len(CLASS_NAMES)


# ---------------------------------------------------------------- rendering

_CHUNK = 1200        # images rendered per numpy pass (keeps the temporaries in cache)


class _Placement:
    """Random position, scale and rotation of m shapes; all arrays of shape (m, 1, 1) float32."""

    def __init__(self, rng, m, size, max_tan, extent, scale):
        half = size / 2
        self.r = _uniform(rng, *scale, m) * _F(_BASE_RADIUS * size)
        reach = np.maximum(half - 1 - extent * self.r, 0)          # keep the shape inside
        self.cx = _uniform(rng, -1, 1, m) * reach
        self.cy = _uniform(rng, -1, 1, m) * reach
        # rotation by angle a through t = tan(a / 2): exact arithmetic, no sin/cos
        t = _uniform(rng, -max_tan, max_tan, m)
        self.cos = (1 - t * t) / (1 + t * t)
        self.sin = (2 * t) / (1 + t * t)

    def local(self, sl, grid):
        """Local coordinates (u, v), shape (len, H, W), of the images in slice sl."""
        dx = grid.reshape(1, 1, -1) - self.cx[sl]                  # (m, 1, W)
        dy = grid.reshape(1, -1, 1) - self.cy[sl]                  # (m, H, 1)
        c, s = self.cos[sl], self.sin[sl]
        return c * dx + s * dy, c * dy - s * dx


class _Stray:
    """Clutter: a short axis-aligned segment (horizontal or vertical) anywhere in the image."""

    def __init__(self, rng, m, size):
        half = size / 2
        self.cx = _uniform(rng, -half, half, m)
        self.cy = _uniform(rng, -half, half, m)
        length = _uniform(rng, *_CLUTTER_SCALE, m) * _F(_BASE_RADIUS * size)
        vertical = rng.random(m).reshape(m, 1, 1) < 0.5
        self.hu = np.where(vertical, _F(0), length)
        self.hv = np.where(vertical, length, _F(0))

    def distance2(self, sl, grid):
        """Squared distance from every pixel to the segments of the images in slice sl."""
        du = np.maximum(np.abs(grid.reshape(1, 1, -1) - self.cx[sl]) - self.hu[sl], 0)   # (m, 1, W)
        dv = np.maximum(np.abs(grid.reshape(1, -1, 1) - self.cy[sl]) - self.hv[sl], 0)   # (m, H, 1)
        return (du * du) + (dv * dv)


def _uniform(rng, lo, hi, m):
    """m float32 draws in [lo, hi), shaped (m, 1, 1) to broadcast over the pixel grid."""
    return (lo + (hi - lo) * rng.random(m)).astype(_F).reshape(m, 1, 1)


class _ClassBatch:
    """The random parameters of m images of class k, drawn up front; rendered chunk by chunk."""

    def __init__(self, rng, k, m, size):
        self.shape, max_tan, extent = _SHAPES[k]
        self.m = m
        self.place = _Placement(rng, m, size, max_tan, extent, _SCALE)
        self.thick = _uniform(rng, *_THICKNESS, m)
        self.level = _uniform(rng, *_INK, m)
        self.stray = _Stray(rng, m, size)
        self.stray_thick = _uniform(rng, *_CLUTTER_THICKNESS, m)
        self.stray_level = _uniform(rng, *_CLUTTER_INK, m)

    def render(self, sl, grid):
        """Noise-free images of slice sl of the batch, shape (len, H, W)."""
        u, v = self.place.local(sl, grid)
        ink = self.shape(u, v, self.place.r[sl], self.thick[sl])
        ink *= self.level[sl]
        faint = _stroke2(self.stray.distance2(sl, grid), self.stray_thick[sl])
        faint *= self.stray_level[sl]
        return np.maximum(ink, faint, out=ink)


def _add_noise(rng, x, sigma):
    """Add approximately Gaussian noise of std sigma to x in place, then clip to [0, 1].

    Each noise value is the sum of the four bytes of one 32-bit word (Irwin-Hall: a bell curve
    with |z| < 3.47 sigma), centred and scaled. The words are raw 64-bit draws split
    little-endian; integer sums are exact, so unlike a ziggurat sampler no libm call can make
    platforms disagree.
    """
    flat = x.reshape(-1)
    count = flat.size
    raw = rng.bit_generator.random_raw((count + 1) // 2).astype("<u8", copy=False)
    w = raw.view("<u4")[:count]
    pairs = w & np.uint32(0x00FF00FF)                 # bytes 0 and 2, as two 16-bit lanes
    pairs += (w >> 8) & np.uint32(0x00FF00FF)         # + bytes 1 and 3
    z = ((pairs & 0xFFFF) + (pairs >> 16)).astype(_F)
    z -= _F(2 * 255)
    z *= _F(sigma / math.sqrt(4 * (256.0 ** 2 - 1) / 12))
    flat += z
    np.clip(flat, 0, 1, out=flat)


def _check_int(name, value, lowest, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lowest:
        raise DataError(f"bad {name} {value!r} for the synthetic dataset; accepted: {what}")
    return int(value)


def make_shapes(n, seed=0, size=28, noise=0.1):
    """Generate the "shapes and strokes" dataset (see the module docstring).

    Returns ``(x, y)``: x of shape (n, 1, size, size), float32 in [0, 1]; y of shape (n,),
    int64 in 0..9. Every class occurs n // 10 or n // 10 + 1 times, in an order shuffled by
    ``seed``. The same arguments give bit-identical arrays on every machine.
    """
    n = _check_int("n", n, 1, "an integer >= 1 (number of images)")
    seed = _check_int("seed", seed, 0, "an integer >= 0")
    size = _check_int("size", size, _MIN_SIZE, f"an integer >= {_MIN_SIZE} (image side in pixels)")
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not 0 <= noise < math.inf:
        raise DataError(f"bad noise {noise!r} for the synthetic dataset; "
                        "accepted: a finite number >= 0 (std of the pixel noise)")

    rng = np.random.Generator(np.random.PCG64(seed))
    ncls = len(CLASS_NAMES)
    y = (np.arange(n) % ncls).astype(np.int64)[rng.permutation(n)]
    where = [np.flatnonzero(y == k) for k in range(ncls)]
    # all shape parameters first (so `noise` changes only the noise), then render in chunks of
    # _CHUNK images of one class (small temporaries stay in cache), add noise, scatter into x
    batches = [_ClassBatch(rng, k, len(where[k]), size) for k in range(ncls)]
    grid = np.arange(size, dtype=_F) - _F((size - 1) / 2)
    x = np.empty((n, 1, size, size), dtype=_F)
    for idx, batch in zip(where, batches):
        for i in range(0, batch.m, _CHUNK):
            sl = slice(i, i + _CHUNK)
            images = batch.render(sl, grid)
            if noise > 0:
                _add_noise(rng, images, float(noise))
            x[idx[sl], 0] = images
    return x, y
