"""K-quant quantizers (Q4_K, Q5_K, Q6_K) in numpy, bit-identical to llama.cpp's reference ones.

gguf-py dequantizes the K-quants but has no quantizer for them. These write, byte for byte, what
ggml-quants.c's `quantize_row_q4_K_ref`, `quantize_row_q5_K_ref` and `quantize_row_q6_K_ref` write
(with their helpers `make_qkx2_quants`, `make_qx_quants` and `nearest_int`): what `quantize_q4_K`,
`quantize_q5_K` and `quantize_q6_K` -- and so llama.cpp's `llama-quantize` -- produce without an
importance matrix.

    kquants.quantize(data, qtype)   # float32 (..., n) -> uint8 (..., n // 256 * block bytes)

`quantize` takes any gguf.GGMLQuantizationType: the three K-quants are done here, every other type
by `gguf.quants.quantize` (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 there are bit-identical to llama.cpp too).

Bit-exactness rests on doing llama.cpp's float32 arithmetic in its order. Every loop over the 32 (or
16) values of a sub-block is vectorized over all sub-blocks at once (values on the first axis,
sub-blocks on the second); the sums are accumulated left to right as C's loops add, one
vectorized add per value (never numpy's pairwise .sum()); each product and
quotient is rounded to float32 where C rounds it; `nearest_int` is ggml's own float trick (round
half to even inside its range); float16 conversions round to nearest even, as GGML_FP32_TO_FP16
does. llama.cpp's CPU-independent ggml-base compiles these functions for baseline x86-64, without
fused multiply-adds; an engine built with -march=native and -ffp-contract=fast may differ in the
last bit of a sum and so, rarely, in a block.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # values per super-block
K_SCALE_SIZE = 12  # packed 6-bit scales and mins of a Q4_K / Q5_K block
BLOCK_BYTES = {"Q4_K": 2 + 2 + K_SCALE_SIZE + QK_K // 2,            # d, dmin, scales, qs: 144
               "Q5_K": 2 + 2 + K_SCALE_SIZE + QK_K // 8 + QK_K // 2,  # d, dmin, scales, qh, qs: 176
               "Q6_K": QK_K // 2 + QK_K // 4 + QK_K // 16 + 2}      # ql, qh, scales, d: 210
GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c: a group whose largest |x| is below this is all zero
CHUNK_BLOCKS = 8192  # super-blocks quantized at once (2M values): bounds the temporaries' memory

F32 = np.float32


def _nearest_int(f: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2^23 in float32 and read the mantissa bits (round half to even
    for |f| <= 4194303; outside that range the same garbage as C's)."""
    v = (np.asarray(f, dtype=F32) + F32(12582912.0)).view(np.int32)
    return (v & 0x007FFFFF) - 0x00400000


def _seq_sum(a: np.ndarray, start_at_zero: bool = True) -> np.ndarray:
    """C's `float s = 0; for (i...) s += a[i];` over the first axis (the values of each group; the
    groups are the second axis, so each step is one vectorized add): left to right, from +0 (an
    all -0 sum is +0, as in C), or from a[0] when C starts there."""
    s = a[0] + F32(0) if start_at_zero else a[0].copy()
    for row in a[1:]:
        s += row
    return s


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants for each column of x (n, groups) with weights w: (scale, the_min, L uint8)."""
    mn = np.minimum(x.min(axis=0), F32(0))  # C: the smallest value, then `if (min > 0) min = 0`
    mx = x.max(axis=0)
    flat = mx == mn
    sum_w = _seq_sum(w, start_at_zero=False)
    sum_x = _seq_sum(w * x, start_at_zero=False)
    iscale = F32(nmax) / (mx - mn)
    scale = F32(1) / iscale
    L = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax).astype(np.uint8)
    diff = scale * L.astype(F32) + mn - x
    best_error = _seq_sum(w * (diff * diff))
    for step in range(nstep + 1):
        # C reuses `min` here, which the search below may have moved: so do we
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
        laux = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
        lf = laux.astype(F32)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * lf), _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_min = np.where(positive, F32(0), this_min)
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        diff = this_scale * lf + this_min - x
        cur_error = _seq_sum(w * (diff * diff))
        better = (D > 0) & (cur_error < best_error) & ~flat
        L = np.where(better, laux.astype(np.uint8), L)
        best_error = np.where(better, cur_error, best_error)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L[:, flat] = 0
    scale = np.where(flat, F32(0), scale)
    return scale, -mn, L


def _make_qx_quants(x: np.ndarray, nmax: int):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) for each column of x (n, groups):
    (scale, L uint8 in [0, 2 nmax))."""
    cols = np.arange(x.shape[1])
    at = np.abs(x).argmax(axis=0)  # the first largest |x|, as C's strict `>` keeps
    amax, mx = np.abs(x[at, cols]), x[at, cols]
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def try_scale(iscale):
        l = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        lf = l.astype(F32)
        return l, _seq_sum(wx * lf), _seq_sum(w * lf * lf)

    l, sumlx, suml2 = try_scale(F32(-nmax) / mx)
    L = (l + nmax).astype(np.uint8)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = try_scale(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better, (l + nmax).astype(np.uint8), L)
        new_scale = sumlx / suml2
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * sumlx, best)
    L[:, zero] = 0
    return np.where(zero, F32(0), scale), L


def _groups(blocks: np.ndarray, n: int) -> np.ndarray:
    """(nb, 256) super-blocks -> (n, nb * 256 / n): one group of n values per column."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(len(v), 2)


def _qkx_super_blocks(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The shared part of quantize_row_q4_K_ref / _q5_K_ref: (d, dmin, packed scales, L (nb, 256))."""
    nb = len(blocks)
    x = _groups(blocks, 32)
    av_x = np.sqrt(_seq_sum(x * x) / F32(32))
    weights = av_x + np.abs(x)
    scales, mins, L = _make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.T.reshape(nb, 8, 32)
    max_scale = scales.max(axis=1)
    max_scale = np.where(max_scale > 0, max_scale, F32(0))
    max_min = mins.max(axis=1)
    max_min = np.where(max_min > 0, max_min, F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
    inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    # C: uint8_t ls = nearest_int(...); ls = MIN(63, ls)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    packed = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                             lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)
    d = (max_scale / F32(63)).astype(np.float16)
    dmin = (max_min / F32(63)).astype(np.float16)
    # requantize with the rounded scales (get_scale_min_k4 unpacks exactly ls and lm)
    sd = d.astype(F32)[:, None] * ls.astype(F32)
    sm = dmin.astype(F32)[:, None] * lm.astype(F32)
    l = np.clip(_nearest_int((blocks.reshape(nb, 8, 32) + sm[..., None]) / sd[..., None]), 0, nmax).astype(np.uint8)
    L = np.where((sd == 0)[..., None], L, l)  # C skips a sub-block whose scale is 0, keeping its L
    return _f16_bytes(d), _f16_bytes(dmin), packed, L.reshape(nb, QK_K)


def quantize_q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref: float32 (nb, 256) -> uint8 (nb, 144): d, dmin, scales[12], qs[128]."""
    d, dmin, scales, L = _qkx_super_blocks(blocks, 15, -1.0, 0.1, 20)
    L = L.reshape(len(L), 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(len(L), QK_K // 2)
    return np.concatenate([d, dmin, scales, qs], axis=1)


def quantize_q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q5_K_ref: float32 (nb, 256) -> uint8 (nb, 176): d, dmin, scales[12], qh[32], qs[128]."""
    d, dmin, scales, L = _qkx_super_blocks(blocks, 31, -0.5, 0.1, 15)
    L = L.reshape(len(L), 4, 2, 32)  # 64-value chunks n, low / high half, 32 values
    high = (L >> 4).astype(np.uint8)  # 1 where the value is over 15
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None, None] + np.arange(2, dtype=np.uint8)[None, None, :, None]
    qh = np.bitwise_or.reduce((high << shifts).reshape(len(L), 8, 32), axis=1).astype(np.uint8)
    low = L & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(len(L), QK_K // 2)
    return np.concatenate([d, dmin, scales, qh, qs], axis=1)


def quantize_q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref: float32 (nb, 256) -> uint8 (nb, 210): ql[128], qh[64], scales[16] (int8), d."""
    nb = len(blocks)
    scales, L = _make_qx_quants(_groups(blocks, 16), 32)
    scales, L = scales.reshape(nb, 16), L.T.reshape(nb, 16, 16)
    rows = np.arange(nb)
    at = np.abs(scales).argmax(axis=1)
    max_scale, max_abs = scales[rows, at], np.abs(scales[rows, at])
    zero = max_abs < GROUP_MAX_EPS
    iscale = F32(-128) / max_scale
    d = (F32(1) / iscale).astype(np.float16)
    # C: int8_t scales[ib] = MIN(127, nearest_int(iscale * scales[ib]))
    sc = (np.minimum(_nearest_int(iscale[:, None] * scales), 127) & 0xFF).astype(np.uint8).view(np.int8)
    sd = d.astype(F32)[:, None] * sc.astype(F32)
    l = (np.clip(_nearest_int(blocks.reshape(nb, 16, 16) / sd[..., None]), -32, 31) + 32).astype(np.uint8)
    L = np.where((sd == 0)[..., None], L, l).reshape(nb, 2, 4, 32)  # 128-value halves, 4 quarters of 32
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, QK_K // 2)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(nb, QK_K // 4)
    out = np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)
    out[zero] = 0  # C: memset(&y[i], 0, ...) and d = +0
    return out


BLOCK_QUANTIZERS = {"Q4_K": quantize_q4_k_blocks, "Q5_K": quantize_q5_k_blocks, "Q6_K": quantize_q6_k_blocks}


def quantize(data: np.ndarray, qtype) -> np.ndarray:
    """gguf.quants.quantize with the K-quants added: float32 (..., n) -> the tensor's bytes,
    uint8 (..., n // block values * block bytes) (float32 / float16 arrays for F32 / F16)."""
    import gguf

    name = gguf.GGMLQuantizationType(qtype).name
    if name not in BLOCK_QUANTIZERS:
        return gguf.quants.quantize(data, qtype)
    data = np.asarray(data, dtype=F32)
    n = data.shape[-1]
    if n % QK_K:
        raise ValueError(f"{name}: rows of {n} values do not split into blocks of {QK_K}")
    blocks = data.reshape(-1, QK_K)
    out = np.empty((len(blocks), BLOCK_BYTES[name]), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # masked out as C skips them
        for start in range(0, len(blocks), CHUNK_BLOCKS):
            out[start:start + CHUNK_BLOCKS] = BLOCK_QUANTIZERS[name](blocks[start:start + CHUNK_BLOCKS])
    return out.reshape(*data.shape[:-1], n // QK_K * BLOCK_BYTES[name])
