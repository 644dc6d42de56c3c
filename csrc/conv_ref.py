"""Pure-numpy references for the kernels in `conv.pyx`, written for reading, not for speed.

Same signatures and conventions as the native kernels: x (N, C, H, W), w (O, C/groups, KH, KW),
b (O,) or None, stride (sh, sw), pads (top, left, bottom, right) as in ONNX, dilation (dh, dw).
They keep the inputs' dtype (float64 in, float64 out), so the tests can take finite differences.

A convolution is a sum over kernel offsets: for offset (kh, kw) every output pixel (oh, ow) reads the
padded input at (oh*sh + kh*dh, ow*sw + kw*dw), and channel mixing within a group is a matrix product.
"""

import numpy as np


def _window(kh: int, kw: int, stride, dilation, out_hw) -> tuple[slice, slice]:
    """The rows and columns of the padded input that kernel offset (kh, kw) reads, one per output pixel."""
    (sh, sw), (dh, dw), (oh, ow) = stride, dilation, out_hw
    rows = slice(kh * dh, kh * dh + (oh - 1) * sh + 1, sh)
    cols = slice(kw * dw, kw * dw + (ow - 1) * sw + 1, sw)
    return rows, cols


def _pad(x: np.ndarray, pads) -> np.ndarray:
    top, left, bottom, right = pads
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def conv2d_forward_ref(x, w, b, stride, pads, dilation, groups, out_hw) -> np.ndarray:
    """y[n, o, i, j] = b[o] + sum over c in o's group, kh, kw of w[o, c, kh, kw] * xpad[n, c, i*sh + kh*dh, j*sw + kw*dw]."""
    x, w = np.asarray(x), np.asarray(w)
    n = x.shape[0]
    o, cg, kh_size, kw_size = w.shape
    og = o // groups
    xp = _pad(x, pads)
    y = np.zeros((n, o, *out_hw), dtype=np.result_type(x, w))
    for g in range(groups):
        xg = xp[:, g * cg : (g + 1) * cg]
        wg = w[g * og : (g + 1) * og]
        for kh in range(kh_size):
            for kw in range(kw_size):
                rows, cols = _window(kh, kw, stride, dilation, out_hw)
                y[:, g * og : (g + 1) * og] += np.einsum(
                    "ncij,oc->noij", xg[:, :, rows, cols], wg[:, :, kh, kw]
                )
    if b is not None:
        y += np.asarray(b)[None, :, None, None]
    return y


def conv2d_backward_ref(x, w, dy, stride, pads, dilation, groups, need_dx=True, need_db=True):
    """(dx or None, dw, db or None): the gradients of sum(dy * conv2d_forward_ref(x, w, b, ...))."""
    x, w, dy = np.asarray(x), np.asarray(w), np.asarray(dy)
    top, left = pads[0], pads[1]
    h, w_in = x.shape[2:]
    out_hw = dy.shape[2:]
    o, cg, kh_size, kw_size = w.shape
    og = o // groups
    xp = _pad(x, pads)
    dxp = np.zeros(xp.shape, dtype=np.result_type(x, w, dy))
    dw = np.zeros(w.shape, dtype=np.result_type(x, w, dy))
    for g in range(groups):
        xg = xp[:, g * cg : (g + 1) * cg]
        wg = w[g * og : (g + 1) * og]
        dyg = dy[:, g * og : (g + 1) * og]
        for kh in range(kh_size):
            for kw in range(kw_size):
                rows, cols = _window(kh, kw, stride, dilation, out_hw)
                dw[g * og : (g + 1) * og, :, kh, kw] += np.einsum("noij,ncij->oc", dyg, xg[:, :, rows, cols])
                dxp[:, g * cg : (g + 1) * cg, rows, cols] += np.einsum("noij,oc->ncij", dyg, wg[:, :, kh, kw])
    dx = dxp[:, :, top : top + h, left : left + w_in] if need_dx else None
    db = dy.sum(axis=(0, 2, 3)) if need_db else None
    return dx, dw, db
