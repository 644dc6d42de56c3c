"""Pure-numpy references for the kernels in `pool.pyx`, written for reading, not for speed.

Same names with `_ref`, same arguments and semantics (see `pool.pyx`). They keep the input's dtype, so the
gradient tests can run them in float64. Each pooling window is visited one kernel offset (i, j) at a time,
in row-major order, over a zero-padded copy of the input: the padded copy is large enough for every
window, ceil-mode windows that run past the bottom/right padding included, and two masks say which
padded positions are real input elements and which lie inside the padded extent [-top, H + bottom).
"""

import numpy as np


def _padded(a: np.ndarray, kernel, stride, pads, out_hw, fill=0) -> np.ndarray:
    """a (..., H, W) placed at (top, left) in a (..., Hp, Wp) array of `fill`, Hp/Wp covering every window."""
    (kh, kw), (sh, sw), (pt, pl, _, _), (oh, ow) = kernel, stride, pads, out_hw
    h, w = a.shape[-2:]
    hp = max(pt + h, (oh - 1) * sh + kh)
    wp = max(pl + w, (ow - 1) * sw + kw)
    out = np.full((*a.shape[:-2], hp, wp), fill, dtype=a.dtype)
    out[..., pt : pt + h, pl : pl + w] = a
    return out


def _offsets(kernel, stride, out_hw):
    """(i, j, window slice) for each kernel offset in row-major order; the slice picks offset (i, j) of
    every window of the padded array, one per output position."""
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, out_hw
    for i in range(kh):
        for j in range(kw):
            yield i, j, (..., slice(i, i + (oh - 1) * sh + 1, sh), slice(j, j + (ow - 1) * sw + 1, sw))


def maxpool_forward_ref(x, kernel, stride, pads, out_hw):
    """y (N, C, OH, OW) and argmax int32 (flat h*W + w of the first maximum, first NaN, or -1 if no real
    element is in the window, where y is 0)."""
    x = np.asarray(x)
    n, c, h, w = x.shape
    oh, ow = out_hw
    y = np.zeros((n, c, oh, ow), dtype=x.dtype)
    argmax = np.full((n, c, oh, ow), -1, dtype=np.int32)
    if oh == 0 or ow == 0:
        return y, argmax
    xp = _padded(x, kernel, stride, pads, out_hw)
    index = _padded(np.arange(h * w, dtype=np.int32).reshape(h, w), kernel, stride, pads, out_hw, fill=-1)
    for _, _, window in _offsets(kernel, stride, out_hw):
        cand, cand_index = xp[window], index[window]
        real = cand_index >= 0
        # Strictly greater (ties keep the first), or the first NaN; nothing beats a NaN already found.
        beats = (cand > y) | (np.isnan(cand) & ~np.isnan(y))
        take = real & ((argmax < 0) | beats)
        y = np.where(take, cand, y)
        argmax = np.where(take, cand_index, argmax)
    return y, argmax


def maxpool_backward_ref(dy, argmax, in_hw):
    """dx (N, C, H, W): each dy element added to its window's argmax position (none for argmax -1)."""
    dy, argmax = np.asarray(dy), np.asarray(argmax)
    n, c = dy.shape[:2]
    h, w = in_hw
    dx = np.zeros((n * c, h * w), dtype=dy.dtype)
    planes = np.broadcast_to(np.arange(n * c)[:, None], (n * c, dy[0, 0].size))
    flat_dy, flat_arg = dy.reshape(n * c, -1), argmax.reshape(n * c, -1)
    real = flat_arg >= 0
    np.add.at(dx, (planes[real], flat_arg[real]), flat_dy[real])
    return dx.reshape(n, c, h, w)


def _avg_divisor(shape_hw, kernel, stride, pads, out_hw, count_include_pad, dtype) -> np.ndarray:
    """(OH, OW) divisors: real elements per window, or the window's area inside the padded extent."""
    h, w = shape_hw
    pt, pl, pb, pr = pads
    if count_include_pad:
        mask = np.ones((pt + h + pb, pl + w + pr))
        mask = _padded(mask, kernel, stride, (0, 0, 0, 0), out_hw)
    else:
        mask = _padded(np.ones((h, w)), kernel, stride, pads, out_hw)
    count = np.zeros(out_hw)
    for _, _, window in _offsets(kernel, stride, out_hw):
        count += mask[window]
    return count.astype(dtype)


def avgpool_forward_ref(x, kernel, stride, pads, out_hw, count_include_pad):
    """y (N, C, OH, OW): the sum of each window's real elements over its divisor; 0 where the divisor is 0."""
    x = np.asarray(x)
    n, c, h, w = x.shape
    oh, ow = out_hw
    if oh == 0 or ow == 0:
        return np.zeros((n, c, oh, ow), dtype=x.dtype)
    xp = _padded(x, kernel, stride, pads, out_hw)
    total = np.zeros((n, c, oh, ow), dtype=x.dtype)
    for _, _, window in _offsets(kernel, stride, out_hw):
        total += xp[window]  # padding adds zeros: the same float sum as over the real elements alone
    div = _avg_divisor((h, w), kernel, stride, pads, out_hw, count_include_pad, x.dtype)
    return np.where(div > 0, total / np.where(div > 0, div, 1), 0).astype(x.dtype)


def avgpool_backward_ref(dy, in_hw, kernel, stride, pads, count_include_pad):
    """dx (N, C, H, W): dy / divisor spread over each window's real elements."""
    dy = np.asarray(dy)
    n, c, oh, ow = dy.shape
    h, w = in_hw
    pt, pl = pads[:2]
    if oh == 0 or ow == 0:
        return np.zeros((n, c, h, w), dtype=dy.dtype)
    div = _avg_divisor((h, w), kernel, stride, pads, (oh, ow), count_include_pad, dy.dtype)
    g = np.where(div > 0, dy / np.where(div > 0, div, 1), 0).astype(dy.dtype)
    dxp = _padded(np.zeros((n, c, h, w), dtype=dy.dtype), kernel, stride, pads, (oh, ow))
    for _, _, window in _offsets(kernel, stride, (oh, ow)):
        dxp[window] += g
    return dxp[..., pt : pt + h, pl : pl + w].copy()  # what landed on padding is dropped


def global_avgpool_forward_ref(x):
    """(N, C, 1, 1) plane means, summed in float64; an empty plane gives 0."""
    x = np.asarray(x)
    hw = x.shape[2] * x.shape[3]
    total = x.sum(axis=(2, 3), keepdims=True, dtype=np.float64)
    return (total / hw if hw else total).astype(x.dtype)


def global_avgpool_backward_ref(dy, in_hw):
    """dx (N, C, H, W) = dy / (H*W) everywhere in the plane."""
    dy = np.asarray(dy)
    h, w = in_hw
    g = dy / dy.dtype.type(h * w) if h * w else dy
    return np.broadcast_to(g, (*dy.shape[:2], h, w)).astype(dy.dtype)
