// quants.h: quantized block formats, the reference quantizers, and the dot-product kernels.
//
// Weights: GGUF's blocks, byte for byte as ggml defines them (ggml-common.h). 32-element blocks:
//   Q8_0  34 bytes  x[j] = d * qs[j]                      qs int8
//   Q4_0  18 bytes  x[j] = d * (q[j] - 8)                 q 4-bit, unsigned
//   Q4_1  20 bytes  x[j] = d * q[j] + m                   q 4-bit, unsigned
//   Q5_0  22 bytes  x[j] = d * (q[j] - 16)                q 5-bit: a nibble + bit j of qh
//   Q5_1  24 bytes  x[j] = d * q[j] + m                   q 5-bit: a nibble + bit j of qh
// In these formats byte qs[j] holds element j in its low nibble and element j+16 in its high
// nibble. d and m are fp16.
// K-quants: 256-element super-blocks (QK_K) of sub-blocks with their own 6- or 8-bit scales:
//   Q2_K   84 bytes  16 x 16: x = d * sc * q - dmin * m   q 2-bit, sc and m 4-bit   (read only)
//   Q3_K  110 bytes  16 x 16: x = d * (sc - 32) * q        q 3-bit signed, sc 6-bit  (read only)
//   Q4_K  144 bytes   8 x 32: x = d * sc * q - dmin * m   q 4-bit, sc and m 6-bit
//   Q5_K  176 bytes   8 x 32: x = d * sc * q - dmin * m   q 5-bit, sc and m 6-bit
//   Q6_K  210 bytes  16 x 16: x = d * sc * (q - 32)        q 6-bit, sc int8
// (the bit layouts are spelled out at each dequantizer below).
//
// Activations: before a matmul with quantized weights, each activation row is quantized to
// BlockQ8A (int8 with a float scale, like ggml's Q8_0/Q8_1), so every block's dot product runs
// in int8 with int32 accumulation: 32 multiply-adds per AVX2 instruction instead of 8 in f32.
// This costs some accuracy (about 1e-2 relative on logits); models stored as F32/F16 take the
// float path instead, which is what the 1e-3 tests against transformers use. K-quant weights
// take BlockQ8K instead (one float scale per 256 and the sums of each 16 quants, like ggml's
// Q8_K): their sub-block scales then apply in integer arithmetic, one float multiply-add per
// super-block (see "K-quant dot products"). A per-32 scale would work too, at 1.5x the work.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"
#include "gguf.h"

static const int QK = 32;  // elements per quantized block, all types

struct BlockQ8_0 {
    uint16_t d;     // fp16 scale
    int8_t qs[QK];  // quants
};
struct BlockQ4_0 {
    uint16_t d;          // fp16 scale
    uint8_t qs[QK / 2];  // nibbles: element j low, element j+16 high
};
struct BlockQ4_1 {
    uint16_t d;          // fp16 scale
    uint16_t m;          // fp16 minimum
    uint8_t qs[QK / 2];  // nibbles: element j low, element j+16 high
};
struct BlockQ8A {        // activations, our own (never written to a file)
    float d;             // scale: x[j] ~= d * qs[j]
    float s;             // d * sum(qs): the Q4_1 minimum multiplies this
    int8_t qs[QK];
};
struct BlockQ5_0 {
    uint16_t d;          // fp16 scale
    uint8_t qh[4];       // bit j: the fifth bit of element j (little-endian uint32)
    uint8_t qs[QK / 2];  // nibbles: element j low, element j+16 high
};
struct BlockQ5_1 {
    uint16_t d;          // fp16 scale
    uint16_t m;          // fp16 minimum
    uint8_t qh[4];       // bit j: the fifth bit of element j
    uint8_t qs[QK / 2];  // nibbles: element j low, element j+16 high
};

static const int QK_K = 256;  // elements per K-quant super-block

struct BlockQ2_K {
    uint8_t scales[QK_K / 16];  // sub-block j: scale in the low nibble, minimum in the high one
    uint8_t qs[QK_K / 4];       // 2-bit quants, see dequantize_row_q2_K
    uint16_t d;                 // fp16 scale of the scales
    uint16_t dmin;              // fp16 scale of the minimums
};
struct BlockQ3_K {
    uint8_t hmask[QK_K / 8];  // third bit of each quant (set: q - 0, clear: q - 4)
    uint8_t qs[QK_K / 4];     // low 2 bits of each quant
    uint8_t scales[12];       // 16 6-bit scales, see kq3_scale
    uint16_t d;               // fp16 scale of the scales
};
struct BlockQ4_K {
    uint16_t d;               // fp16 scale of the scales
    uint16_t dmin;            // fp16 scale of the minimums
    uint8_t scales[12];       // 8 6-bit scales and 8 6-bit minimums, see kq_scale_min
    uint8_t qs[QK_K / 2];     // 32 bytes per 64 elements: sub-block 2i low nibbles, 2i+1 high
};
struct BlockQ5_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qh[QK_K / 8];     // bit j of qh[k]: the fifth bit of element k of sub-block j
    uint8_t qs[QK_K / 2];     // low nibbles, as Q4_K
};
struct BlockQ6_K {
    uint8_t ql[QK_K / 2];     // low 4 bits, see dequantize_row_q6_K
    uint8_t qh[QK_K / 4];     // high 2 bits
    int8_t scales[QK_K / 16]; // one int8 scale per 16 elements
    uint16_t d;               // fp16 scale of the scales
};
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block must be 34 bytes as in GGUF");
static_assert(sizeof(BlockQ5_0) == 22 && sizeof(BlockQ5_1) == 24, "Q5 blocks must be 22 and 24 bytes as in GGUF");
static_assert(sizeof(BlockQ2_K) == 84 && sizeof(BlockQ3_K) == 110, "Q2_K/Q3_K blocks as in GGUF");
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210,
              "Q4_K/Q5_K/Q6_K blocks as in GGUF");
static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 block must be 18 bytes as in GGUF");
static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 block must be 20 bytes as in GGUF");

// ----------------------------------------------------------------------------
// reference quantizers (bit-identical to gguf-py's gguf.quants, checked by the tests)
//
// The arithmetic is kept in float32 and in the same order as numpy does it; the build uses
// -ffp-contract=off so that the compiler does not fuse x * id + 8.5f into an FMA, which rounds
// differently.

static void quantize_row_q8_0(const float* x, BlockQ8_0* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; b++, x += QK) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = std::max(amax, std::fabs(x[j]));
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = fp32_to_fp16(d);
        for (int j = 0; j < QK; j++) y[b].qs[j] = (int8_t)std::roundf(x[j] * id);  // half away from 0
    }
}

// The block scales of the symmetric (Q4_0, Q5_0) and offset (Q4_1, Q5_1) types come from these.
static inline float block_signed_max(const float* x) {  // the element of largest magnitude, with its sign
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; j++) {
        if (amax < std::fabs(x[j])) {
            amax = std::fabs(x[j]);
            max = x[j];
        }
    }
    return max;
}

static inline void block_min_max(const float* x, float* min, float* max) {
    *min = *max = x[0];
    for (int j = 1; j < QK; j++) {
        *min = std::min(*min, x[j]);
        *max = std::max(*max, x[j]);
    }
}

static void quantize_row_q4_0(const float* x, BlockQ4_0* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; b++, x += QK) {
        float max = block_signed_max(x);
        float d = max / -8.0f;  // so that max maps to q = 0, i.e. -8
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = fp32_to_fp16(d);
        for (int j = 0; j < QK / 2; j++) {
            int q0 = std::min(15, (int)(x[j] * id + 8.5f));
            int q1 = std::min(15, (int)(x[j + QK / 2] * id + 8.5f));
            y[b].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void quantize_row_q4_1(const float* x, BlockQ4_1* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; b++, x += QK) {
        float min, max;
        block_min_max(x, &min, &max);
        float d = (max - min) / 15.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = fp32_to_fp16(d);
        y[b].m = fp32_to_fp16(min);
        for (int j = 0; j < QK / 2; j++) {
            int q0 = std::min(15, (int)((x[j] - min) * id + 0.5f));
            int q1 = std::min(15, (int)((x[j + QK / 2] - min) * id + 0.5f));
            y[b].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

// Q5_0/Q5_1: Q4_0/Q4_1 with a fifth bit per element gathered in qh (llama.cpp's
// quantize_row_q5_0_ref / _q5_1_ref; gguf-py has the same quantizers).
static void quantize_row_q5_0(const float* x, BlockQ5_0* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; b++, x += QK) {
        float max = block_signed_max(x);
        float d = max / -16.0f;  // max maps to q = 0, i.e. -16
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = fp32_to_fp16(d);
        uint32_t qh = 0;
        for (int j = 0; j < QK / 2; j++) {
            uint8_t q0 = (uint8_t)std::min(31, (int)(x[j] * id + 16.5f));
            uint8_t q1 = (uint8_t)std::min(31, (int)(x[j + QK / 2] * id + 16.5f));
            y[b].qs[j] = (uint8_t)((q0 & 0xf) | ((q1 & 0xf) << 4));
            qh |= (uint32_t)((q0 >> 4) & 1) << j;
            qh |= (uint32_t)((q1 >> 4) & 1) << (j + QK / 2);
        }
        memcpy(y[b].qh, &qh, 4);
    }
}

static void quantize_row_q5_1(const float* x, BlockQ5_1* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; b++, x += QK) {
        float min, max;
        block_min_max(x, &min, &max);
        float d = (max - min) / 31.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = fp32_to_fp16(d);
        y[b].m = fp32_to_fp16(min);
        uint32_t qh = 0;
        for (int j = 0; j < QK / 2; j++) {
            // no clamp to 31, as in ggml: a rounding up to 32 keeps only its low bits
            uint8_t q0 = (uint8_t)(int)((x[j] - min) * id + 0.5f);
            uint8_t q1 = (uint8_t)(int)((x[j + QK / 2] - min) * id + 0.5f);
            y[b].qs[j] = (uint8_t)((q0 & 0xf) | ((q1 & 0xf) << 4));
            qh |= (uint32_t)((q0 >> 4) & 1) << j;
            qh |= (uint32_t)((q1 >> 4) & 1) << (j + QK / 2);
        }
        memcpy(y[b].qh, &qh, 4);
    }
}

// ----------------------------------------------------------------------------
// K-quant reference quantizers, bit-identical to llama.cpp's quantize_row_q{4,5,6}_K_ref (what
// llama_model_quantize runs without an importance matrix). Their search for scales is float
// arithmetic whose every rounding decides a bit, so the expressions below keep ggml's operand
// order (a * b * c is (a * b) * c) and -ffp-contract=off keeps them unfused.

// ggml's nearest_int: adding 1.5 * 2^23 leaves no fraction bits, so the float adder rounds half
// to even; the integer is read back from the mantissa. Valid for |x| < 2^22.
static inline int nearest_int(float x) {
    float v = x + 12582912.0f;
    int32_t i;
    memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

// Fits x[i] ~= scale * L[i] - the_min with L in [0, nmax], weighted by w, minimising the squared
// error: a first guess from the range, then nstep + 1 trial scales (rmin + rdelta * is + nmax) /
// range, each refined by weighted least squares (ggml's make_qkx2_quants). Returns the scale.
static float kq_fit_scale_min(int n, int nmax, const float* x, const float* w, uint8_t* L, float* the_min,
                              float rmin, float rdelta, int nstep) {
    float min = x[0], max = x[0];
    float sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0.0f) min = 0.0f;
    if (max == min) {
        for (int i = 0; i < n; i++) L[i] = 0;
        *the_min = -min;
        return 0.0f;
    }
    float iscale = (float)nmax / (max - min);
    float scale = 1.0f / iscale;
    float best_error = 0.0f;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)std::max(0, std::min(nmax, l));
        float diff = scale * (float)L[i] + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    uint8_t Laux[32];
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
        for (int i = 0; i < n; i++) {
            int l = std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - min))));
            Laux[i] = (uint8_t)l;
            float fl = (float)l;
            sum_l += w[i] * fl;
            sum_l2 += w[i] * fl * fl;
            sum_xl += w[i] * fl * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0.0f) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0.0f) {
                this_min = 0.0f;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0.0f;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * (float)Laux[i] + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if (cur_error < best_error) {
                for (int i = 0; i < n; i++) L[i] = Laux[i];
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

// Q4_K/Q5_K's 12 scale bytes: sub-blocks 0-3 keep scale and minimum in the low 6 bits of bytes
// j and j+4; sub-blocks 4-7 keep their low 4 bits in the nibbles of byte j+4 and their top 2
// bits in the top bits of bytes j-4 (scale) and j (minimum).
static inline void kq_scale_min(int j, const uint8_t* s, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Q4_K and Q5_K share everything but nmax (15, 31), the scale search and the bit packing.
// L (256,) receives the quants in element order; the scales go into the block.
template <class Block>
static void kq_quantize_scales_mins(const float* x, Block* y, uint8_t* L, int nmax, float rmin, int nstep) {
    float scales[8], mins[8], weights[32];
    float max_scale = 0.0f, max_min = 0.0f;  // the minimum is subtracted, so scales are positive
    for (int j = 0; j < 8; j++) {
        const float* xj = x + 32 * j;
        float sum_x2 = 0.0f;
        for (int l = 0; l < 32; l++) sum_x2 += xj[l] * xj[l];
        float av_x = std::sqrt(sum_x2 / 32.0f);
        for (int l = 0; l < 32; l++) weights[l] = av_x + std::fabs(xj[l]);
        scales[j] = kq_fit_scale_min(32, nmax, xj, weights, L + 32 * j, &mins[j], rmin, 0.1f, nstep);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
    float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
    for (int j = 0; j < 8; j++) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]), lm = (uint8_t)nearest_int(inv_min * mins[j]);
        ls = std::min<uint8_t>(63, ls);
        lm = std::min<uint8_t>(63, lm);
        if (j < 4) {
            y->scales[j] = ls;
            y->scales[j + 4] = lm;
        } else {
            y->scales[j + 4] = (uint8_t)((ls & 0xf) | ((lm & 0xf) << 4));
            y->scales[j - 4] |= (uint8_t)((ls >> 4) << 6);
            y->scales[j] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    y->d = fp32_to_fp16(max_scale / 63.0f);
    y->dmin = fp32_to_fp16(max_min / 63.0f);
    // requantize against the scales as stored (6-bit, fp16)
    for (int j = 0; j < 8; j++) {
        int sc, m;
        kq_scale_min(j, y->scales, &sc, &m);
        const float d = fp16_to_fp32(y->d) * (float)sc;
        if (d == 0.0f) continue;  // keeps the fit's quants, as ggml does
        const float dm = fp16_to_fp32(y->dmin) * (float)m;
        for (int l = 0; l < 32; l++) {
            int q = nearest_int((x[32 * j + l] + dm) / d);
            L[32 * j + l] = (uint8_t)std::max(0, std::min(nmax, q));
        }
    }
}

static void quantize_row_q4_K(const float* x, BlockQ4_K* y, int64_t n) {
    uint8_t L[QK_K];
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        kq_quantize_scales_mins(x, &y[b], L, 15, -1.0f, 20);
        for (int c = 0; c < 4; c++) {  // 64 elements -> 32 bytes: the first 32 low, the next 32 high
            for (int l = 0; l < 32; l++) y[b].qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
        }
    }
}

static void quantize_row_q5_K(const float* x, BlockQ5_K* y, int64_t n) {
    uint8_t L[QK_K];
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        kq_quantize_scales_mins(x, &y[b], L, 31, -0.5f, 15);
        memset(y[b].qh, 0, sizeof(y[b].qh));
        for (int c = 0; c < 4; c++) {
            for (int l = 0; l < 32; l++) {
                int l1 = L[64 * c + l], l2 = L[64 * c + 32 + l];
                y[b].qs[32 * c + l] = (uint8_t)((l1 & 0xf) | ((l2 & 0xf) << 4));
                y[b].qh[l] |= (uint8_t)(((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1)));
            }
        }
    }
}

// Fits x[i] ~= scale * (L[i] - 32) for 16 values, L in [0, 63], weights x^2: the scale from the
// largest magnitude, then 18 nearby trial scales kept when they improve the weighted
// least-squares fit (ggml's make_qx_quants with nmax = 32, rmse_type = 1). Returns the scale.
static float kq_fit_scale_q6(const float* x, int8_t* L) {
    const int n = 16, nmax = 32;
    float max = 0.0f, amax = 0.0f;
    for (int i = 0; i < n; i++) {
        float ax = std::fabs(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < 1e-15f) {  // all zero
        for (int i = 0; i < n; i++) L[i] = 0;
        return 0.0f;
    }
    float iscale = (float)-nmax / max;
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; i++) {
        int l = std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i])));
        L[i] = (int8_t)(l + nmax);
        float w = x[i] * x[i], fl = (float)l;
        sumlx += w * x[i] * fl;
        suml2 += w * fl * fl;
    }
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)is) / max;
        sumlx = suml2 = 0.0f;
        for (int i = 0; i < n; i++) {
            int l = std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i])));
            float w = x[i] * x[i], fl = (float)l;
            sumlx += w * x[i] * fl;
            suml2 += w * fl * fl;
        }
        if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) {
                L[i] = (int8_t)(nmax + std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i]))));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

static void quantize_row_q6_K(const float* x, BlockQ6_K* y, int64_t n) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        float max_scale = 0.0f, max_abs_scale = 0.0f;
        for (int j = 0; j < QK_K / 16; j++) {
            scales[j] = kq_fit_scale_q6(x + 16 * j, L + 16 * j);
            if (std::fabs(scales[j]) > max_abs_scale) {
                max_abs_scale = std::fabs(scales[j]);
                max_scale = scales[j];
            }
        }
        if (max_abs_scale < 1e-15f) {
            memset(&y[b], 0, sizeof(BlockQ6_K));
            continue;
        }
        float iscale = -128.0f / max_scale;
        y[b].d = fp32_to_fp16(1.0f / iscale);
        for (int j = 0; j < QK_K / 16; j++) y[b].scales[j] = (int8_t)std::min(127, nearest_int(iscale * scales[j]));
        for (int j = 0; j < QK_K / 16; j++) {  // requantize against the stored scales
            float d = fp16_to_fp32(y[b].d) * (float)y[b].scales[j];
            if (d == 0.0f) continue;
            for (int l = 0; l < 16; l++) {
                int q = std::max(-32, std::min(31, nearest_int(x[16 * j + l] / d)));
                L[16 * j + l] = (int8_t)(q + 32);
            }
        }
        for (int c = 0; c < 2; c++) {  // 128 elements: 64 bytes of ql, 32 of qh (see dequantize_row_q6_K)
            const int8_t* Lc = L + 128 * c;
            uint8_t* ql = y[b].ql + 64 * c;
            uint8_t* qh = y[b].qh + 32 * c;
            for (int l = 0; l < 32; l++) {
                ql[l] = (uint8_t)((Lc[l] & 0xf) | ((Lc[l + 64] & 0xf) << 4));
                ql[l + 32] = (uint8_t)((Lc[l + 32] & 0xf) | ((Lc[l + 96] & 0xf) << 4));
                qh[l] = (uint8_t)((Lc[l] >> 4) | ((Lc[l + 32] >> 4) << 2) | ((Lc[l + 64] >> 4) << 4) |
                                  ((Lc[l + 96] >> 4) << 6));
            }
        }
    }
}

// ----------------------------------------------------------------------------
// dequantizers for the 5-bit and K-quant formats (the same float operations as ggml's
// dequantize_row_*, so gguf-py's numpy dequantizers agree bit for bit)

static inline int q5_bit(const uint8_t* qh, int j) { return (qh[j / 8] >> (j % 8)) & 1; }

static void dequantize_row_q5(uint32_t type, const void* src, float* y, int64_t n) {
    for (int64_t i = 0; i < n / QK; i++, y += QK) {
        const uint8_t *qs, *qh;
        float d, m;
        if (type == GGML_TYPE_Q5_0) {
            const BlockQ5_0& b = ((const BlockQ5_0*)src)[i];
            qs = b.qs, qh = b.qh, d = fp16_to_fp32(b.d), m = 0.0f;
        } else {
            const BlockQ5_1& b = ((const BlockQ5_1*)src)[i];
            qs = b.qs, qh = b.qh, d = fp16_to_fp32(b.d), m = fp16_to_fp32(b.m);
        }
        for (int j = 0; j < QK; j++) {
            int q = ((qs[j % 16] >> (4 * (j / 16))) & 0xf) | (q5_bit(qh, j) << 4);
            y[j] = type == GGML_TYPE_Q5_0 ? (float)(q - 16) * d : (float)q * d + m;
        }
    }
}

// Q2_K: per 128 elements, 32 bytes of qs; bits 2i..2i+1 of qs[l] are element l of 32-group i,
// groups of 16 have their own scale byte (scale low nibble, minimum high nibble).
static void dequantize_row_q2_K(const BlockQ2_K* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fp16_to_fp32(x[i].d), dmin = fp16_to_fp32(x[i].dmin);
        const uint8_t* q = x[i].qs;
        int is = 0;
        for (int c = 0; c < 2; c++, q += 32) {
            for (int g = 0; g < 4; g++) {
                for (int h = 0; h < 2; h++) {
                    uint8_t sc = x[i].scales[is++];
                    float dl = d * (float)(sc & 0xf), ml = dmin * (float)(sc >> 4);
                    for (int l = 0; l < 16; l++) *y++ = dl * (float)((q[16 * h + l] >> (2 * g)) & 3) - ml;
                }
            }
        }
    }
}

// Q3_K's 16 6-bit scales: low 4 bits in the nibbles of bytes 0-7 (j < 8 low, j >= 8 high),
// top 2 bits in bits 2*(j/4) of byte 8 + j%4.
static inline int kq3_scale(const uint8_t* s, int j) {
    int lo = j < 8 ? s[j] & 0xf : s[j - 8] >> 4;
    int hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    return (lo | (hi << 4)) - 32;
}

// Q3_K: the low 2 bits as Q2_K's; bit (4c + g) of hmask[l] is the third bit of element l of
// 32-group g in 128-chunk c, and a clear bit means q - 4.
static void dequantize_row_q3_K(const BlockQ3_K* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fp16_to_fp32(x[i].d);
        const uint8_t* q = x[i].qs;
        int is = 0;
        uint8_t m = 1;
        for (int c = 0; c < 2; c++, q += 32) {
            for (int g = 0; g < 4; g++, m = (uint8_t)(m << 1)) {
                for (int h = 0; h < 2; h++) {
                    float dl = d * (float)kq3_scale(x[i].scales, is++);
                    for (int l = 16 * h; l < 16 * h + 16; l++) {
                        *y++ = dl * (float)(((q[l] >> (2 * g)) & 3) - ((x[i].hmask[l] & m) ? 0 : 4));
                    }
                }
            }
        }
    }
}

// Q4_K/Q5_K: per 64 elements, 32 bytes of qs; sub-block 2c takes the low nibbles, 2c+1 the high
// ones; Q5_K's fifth bit of element l of sub-block j is bit j of qh[l].
template <bool five, class Block>
static inline int q45_quant(const Block& b, int j, int l) {
    int v = (b.qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xf;
    if constexpr (five) v |= ((((const BlockQ5_K*)&b)->qh[l] >> j) & 1) << 4;
    return v;
}

template <class Block, bool five>
static void dequantize_row_q45_K(const Block* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fp16_to_fp32(x[i].d), dmin = fp16_to_fp32(x[i].dmin);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            kq_scale_min(j, x[i].scales, &sc, &m);
            const float dj = d * (float)sc, mj = dmin * (float)m;
            for (int l = 0; l < 32; l++) *y++ = dj * (float)q45_quant<five>(x[i], j, l) - mj;
        }
    }
}

// Q6_K: per 128 elements, 64 bytes of ql and 32 of qh. Element l of 32-group g (0..3):
// low 4 bits from ql[l + 32 * (g % 2)] (low nibble for g < 2, high for g >= 2), high 2 bits
// from bits 2g..2g+1 of qh[l]; scale scales[2g + l / 16] (scales advance 8 per 128 elements).
static inline int q6_quant(const uint8_t* ql, const uint8_t* qh, int g, int l) {
    return ((ql[l + 32 * (g % 2)] >> (4 * (g / 2))) & 0xf) | (((qh[l] >> (2 * g)) & 3) << 4);
}

static void dequantize_row_q6_K(const BlockQ6_K* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fp16_to_fp32(x[i].d);
        for (int c = 0; c < 2; c++) {
            const uint8_t *ql = x[i].ql + 64 * c, *qh = x[i].qh + 32 * c;
            const int8_t* sc = x[i].scales + 8 * c;
            for (int g = 0; g < 4; g++) {
                for (int l = 0; l < 32; l++) *y++ = d * (float)sc[2 * g + l / 16] * (float)(q6_quant(ql, qh, g, l) - 32);
            }
        }
    }
}

// the types quantize_row writes (the engine reads Q2_K and Q3_K too, but has no quantizer for them)
static bool can_quantize_row(uint32_t type) { return type != GGML_TYPE_Q2_K && type != GGML_TYPE_Q3_K; }

// Quantizes one row of n floats (n % 32 == 0 for the block types, n % 256 == 0 for the K-quants)
// to `type`.
static void quantize_row(uint32_t type, const float* x, void* y, int64_t n) {
    switch (type) {
        case GGML_TYPE_F32: memcpy(y, x, (size_t)n * 4); break;
        case GGML_TYPE_F16:
            for (int64_t i = 0; i < n; i++) ((uint16_t*)y)[i] = fp32_to_fp16(x[i]);
            break;
        case GGML_TYPE_Q8_0: quantize_row_q8_0(x, (BlockQ8_0*)y, n); break;
        case GGML_TYPE_Q4_0: quantize_row_q4_0(x, (BlockQ4_0*)y, n); break;
        case GGML_TYPE_Q4_1: quantize_row_q4_1(x, (BlockQ4_1*)y, n); break;
        case GGML_TYPE_Q5_0: quantize_row_q5_0(x, (BlockQ5_0*)y, n); break;
        case GGML_TYPE_Q5_1: quantize_row_q5_1(x, (BlockQ5_1*)y, n); break;
        case GGML_TYPE_Q4_K: quantize_row_q4_K(x, (BlockQ4_K*)y, n); break;
        case GGML_TYPE_Q5_K: quantize_row_q5_K(x, (BlockQ5_K*)y, n); break;
        case GGML_TYPE_Q6_K: quantize_row_q6_K(x, (BlockQ6_K*)y, n); break;
        default:
            FAIL("cannot quantize to type %s (vicuna writes F16, Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0; "
                 "it only reads Q2_K and Q3_K)", ggml_type_info(type).name ? ggml_type_info(type).name : "?");
    }
}

static void dequantize_row(uint32_t type, const void* src, float* y, int64_t n) {
    switch (type) {
        case GGML_TYPE_F32: memcpy(y, src, (size_t)n * 4); break;
        case GGML_TYPE_F16: {
            const uint16_t* h = (const uint16_t*)src;
            for (int64_t i = 0; i < n; i++) y[i] = fp16_to_fp32(h[i]);
            break;
        }
        case GGML_TYPE_Q8_0: {
            const BlockQ8_0* b = (const BlockQ8_0*)src;
            for (int64_t i = 0; i < n / QK; i++) {
                float d = fp16_to_fp32(b[i].d);
                for (int j = 0; j < QK; j++) y[i * QK + j] = d * b[i].qs[j];
            }
            break;
        }
        case GGML_TYPE_Q4_0: {
            const BlockQ4_0* b = (const BlockQ4_0*)src;
            for (int64_t i = 0; i < n / QK; i++) {
                float d = fp16_to_fp32(b[i].d);
                for (int j = 0; j < QK / 2; j++) {
                    y[i * QK + j] = d * ((b[i].qs[j] & 0xf) - 8);
                    y[i * QK + j + QK / 2] = d * ((b[i].qs[j] >> 4) - 8);
                }
            }
            break;
        }
        case GGML_TYPE_Q4_1: {
            const BlockQ4_1* b = (const BlockQ4_1*)src;
            for (int64_t i = 0; i < n / QK; i++) {
                float d = fp16_to_fp32(b[i].d), m = fp16_to_fp32(b[i].m);
                for (int j = 0; j < QK / 2; j++) {
                    y[i * QK + j] = d * (b[i].qs[j] & 0xf) + m;
                    y[i * QK + j + QK / 2] = d * (b[i].qs[j] >> 4) + m;
                }
            }
            break;
        }
        case GGML_TYPE_Q5_0:
        case GGML_TYPE_Q5_1: dequantize_row_q5(type, src, y, n); break;
        case GGML_TYPE_Q2_K: dequantize_row_q2_K((const BlockQ2_K*)src, y, n); break;
        case GGML_TYPE_Q3_K: dequantize_row_q3_K((const BlockQ3_K*)src, y, n); break;
        case GGML_TYPE_Q4_K: dequantize_row_q45_K<BlockQ4_K, false>((const BlockQ4_K*)src, y, n); break;
        case GGML_TYPE_Q5_K: dequantize_row_q45_K<BlockQ5_K, true>((const BlockQ5_K*)src, y, n); break;
        case GGML_TYPE_Q6_K: dequantize_row_q6_K((const BlockQ6_K*)src, y, n); break;
        default: FAIL("cannot dequantize type %u", type);
    }
}

// ----------------------------------------------------------------------------
// activation quantization: n floats -> n/32 BlockQ8A (round to nearest)

[[maybe_unused]] static void quantize_act_ref(const float* x, BlockQ8A* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; b++, x += QK) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = std::max(amax, std::fabs(x[j]));
        float d = amax / 127.0f;
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int q = (int)std::nearbyintf(x[j] * id);
            y[b].qs[j] = (int8_t)q;
            sum += q;
        }
        y[b].d = d;
        y[b].s = d * (float)sum;
    }
}

#ifdef VICUNA_AVX2
static inline float hsum_f32x8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline int hsum_i32x8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
#endif

static void quantize_act(const float* x, BlockQ8A* y, int64_t n) {
#ifdef VICUNA_AVX2
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < n / QK; b++, x += QK) {
        __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
        __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign_bit, v0), _mm256_andnot_ps(sign_bit, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign_bit, v2), _mm256_andnot_ps(sign_bit, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float d = amax / 127.0f;
        __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, id), mode));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, id), mode));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, id), mode));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, id), mode));
        int sum = hsum_i32x8(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
        // pack 32 x i32 -> 32 x i8; packs work within 128-bit lanes, so undo the lane interleave
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)y[b].qs, p);
        y[b].d = d;
        y[b].s = d * (float)sum;
    }
#else
    quantize_act_ref(x, y, n);
#endif
}

// K-quant weights get their own activation blocks, one scale per 256 elements (like ggml's Q8_K):
// with a single activation scale per super-block, the sub-block scales apply in integer
// arithmetic and each super-block costs one int -> float conversion and multiply-add per token
// instead of eight, and the weight minimums need only the sums of 16 quants (bsums).
struct BlockQ8K {                // our own (never written to a file)
    float d;                     // scale: x[j] ~= d * qs[j]
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];    // sums of qs in groups of 16
};

[[maybe_unused]] static void quantize_act_k_ref(const float* x, BlockQ8K* y, int64_t n) {
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        float amax = 0.0f;
        for (int j = 0; j < QK_K; j++) amax = std::max(amax, std::fabs(x[j]));
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int j = 16 * g; j < 16 * g + 16; j++) {
                int q = (int)std::nearbyintf(x[j] * id);
                y[b].qs[j] = (int8_t)q;
                sum += q;
            }
            y[b].bsums[g] = (int16_t)sum;
        }
        y[b].d = amax / 127.0f;
    }
}

static void quantize_act_k(const float* x, BlockQ8K* y, int64_t n) {
#ifdef VICUNA_AVX2
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < QK_K; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(x + j)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        for (int j = 0; j < QK_K; j += 32) {
            __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), id), mode));
            __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8), id), mode));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j + 16), id), mode));
            __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j + 24), id), mode));
            y[b].bsums[j / 16] = (int16_t)hsum_i32x8(_mm256_add_epi32(i0, i1));
            y[b].bsums[j / 16 + 1] = (int16_t)hsum_i32x8(_mm256_add_epi32(i2, i3));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i*)(y[b].qs + j), p);
        }
        y[b].d = amax / 127.0f;
    }
#else
    quantize_act_k_ref(x, y, n);
#endif
}

// ----------------------------------------------------------------------------
// dot products: one weight row against NC activation rows at once
//
// Reading a weight block once and using it for several tokens is what makes prefill faster
// than decode: the unpacked nibbles stay in registers. Decode calls the NC = 1 versions.
// Each kernel has a portable *_ref twin: the fallback without AVX2, and the reference the unit
// test compares the SIMD version against.

template <int NC>
static void dot_f32_ref(const float* w, const float* const* x, int n, float* out) {
    for (int c = 0; c < NC; c++) {
        float s = 0.0f;
        for (int j = 0; j < n; j++) s += w[j] * x[c][j];
        out[c] = s;
    }
}

template <int NC>
static void dot_f32(const float* w, const float* const* x, int n, float* out) {
#ifdef VICUNA_AVX2
    __m256 acc[NC][2];
    for (int c = 0; c < NC; c++) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
        for (int c = 0; c < NC; c++) {
            acc[c][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[c] + i), acc[c][0]);
            acc[c][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[c] + i + 8), acc[c][1]);
        }
    }
    for (int c = 0; c < NC; c++) {
        float s = hsum_f32x8(_mm256_add_ps(acc[c][0], acc[c][1]));
        for (int j = i; j < n; j++) s += w[j] * x[c][j];
        out[c] = s;
    }
#else
    dot_f32_ref<NC>(w, x, n, out);
#endif
}

template <int NC>
static void dot_f16_ref(const uint16_t* w, const float* const* x, int n, float* out) {
    for (int c = 0; c < NC; c++) {
        float s = 0.0f;
        for (int j = 0; j < n; j++) s += fp16_to_fp32(w[j]) * x[c][j];
        out[c] = s;
    }
}

template <int NC>
static void dot_f16(const uint16_t* w, const float* const* x, int n, float* out) {
#ifdef VICUNA_AVX2
    __m256 acc[NC];
    for (int c = 0; c < NC; c++) acc[c] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + i)));
        for (int c = 0; c < NC; c++) acc[c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[c] + i), acc[c]);
    }
    for (int c = 0; c < NC; c++) {
        float s = hsum_f32x8(acc[c]);
        for (int j = i; j < n; j++) s += fp16_to_fp32(w[j]) * x[c][j];
        out[c] = s;
    }
#else
    dot_f16_ref<NC>(w, x, n, out);
#endif
}

#ifdef VICUNA_AVX2
// int8 x int8 -> 8 x int32 partial sums. maddubs multiplies unsigned by signed bytes, so move
// the sign of a onto b and take |a|.
static inline __m256i dot_i8x32(__m256i a, __m256i b) {
    __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}
// unsigned 4-bit (as bytes 0..15) x int8 -> 8 x int32
static inline __m256i dot_u4i8x32(__m256i u, __m256i b) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, b), _mm256_set1_epi16(1));
}
// 16 packed bytes -> 32 bytes 0..15 in element order (low nibbles first)
static inline __m256i unpack_nibbles(const uint8_t* qs) {
    __m128i t = _mm_loadu_si128((const __m128i*)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0f));
}
#endif

// The three block types differ only in how a block becomes 32 integer weights (element j of the
// block: weight(b, j); all 32 as bytes in element order: load(b)) and in Q4_1's minimum, so one
// loop serves them all. Q4_1's weights stay unsigned (0..15) for the u8 x i8 multiply:
// sum_j (d q_j + m) (dx qx_j) = d dx sum_j q_j qx_j + m (dx sum_j qx_j) = d dx isum + m s.
// Written as one shift-and-mask, not `j < 16 ? qs[j] & 0xf : qs[j - 16] >> 4`: GCC 12 at -O2/-O3
// with AVX2 vectorized that form of the Q4_0 reference loop into wrong sums (the portable kernel,
// which -DVICUNA_SCALAR=ON builds run, was off by 6 on the unit test's rows; tests/test_vicuna_cpp.py
// now runs the unit test on the optimized and scalar builds too).
static inline int nibble(const uint8_t* qs, int j) { return (qs[j % (QK / 2)] >> (4 * (j / (QK / 2)))) & 0xf; }

struct Q8_0Kind {
    typedef BlockQ8_0 Block;
    static const bool is_unsigned = false, has_min = false;
    static int weight(const Block& b, int j) { return b.qs[j]; }
#ifdef VICUNA_AVX2
    static __m256i load(const Block& b) { return _mm256_loadu_si256((const __m256i*)b.qs); }
#endif
};
struct Q4_0Kind {
    typedef BlockQ4_0 Block;
    static const bool is_unsigned = false, has_min = false;
    static int weight(const Block& b, int j) { return nibble(b.qs, j) - 8; }
#ifdef VICUNA_AVX2
    static __m256i load(const Block& b) { return _mm256_sub_epi8(unpack_nibbles(b.qs), _mm256_set1_epi8(8)); }
#endif
};
struct Q4_1Kind {
    typedef BlockQ4_1 Block;
    static const bool is_unsigned = true, has_min = true;
    static int weight(const Block& b, int j) { return nibble(b.qs, j); }
#ifdef VICUNA_AVX2
    static __m256i load(const Block& b) { return unpack_nibbles(b.qs); }
#endif
};

// Q5_0/Q5_1: a nibble plus the fifth bit from qh
static inline int q5_weight(const uint8_t* qs, const uint8_t* qh, int j) { return nibble(qs, j) | (q5_bit(qh, j) << 4); }
#ifdef VICUNA_AVX2
// the 32 bits of qh as 32 bytes, 0x10 where the bit is set (the fifth bit in place)
static inline __m256i q5_high_bits(const uint8_t* qh) {
    uint32_t bits;
    memcpy(&bits, qh, 4);
    // byte k of the result looks at byte k/8 of bits (shuffles stay within 128-bit lanes, each of
    // which holds all four bytes), then at bit k%8 of it
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(0x10));
}
#endif
struct Q5_0Kind {
    typedef BlockQ5_0 Block;
    static const bool is_unsigned = false, has_min = false;
    static int weight(const Block& b, int j) { return q5_weight(b.qs, b.qh, j) - 16; }
#ifdef VICUNA_AVX2
    static __m256i load(const Block& b) {
        return _mm256_sub_epi8(_mm256_or_si256(unpack_nibbles(b.qs), q5_high_bits(b.qh)), _mm256_set1_epi8(16));
    }
#endif
};
struct Q5_1Kind {
    typedef BlockQ5_1 Block;
    static const bool is_unsigned = true, has_min = true;
    static int weight(const Block& b, int j) { return q5_weight(b.qs, b.qh, j); }
#ifdef VICUNA_AVX2
    static __m256i load(const Block& b) { return _mm256_or_si256(unpack_nibbles(b.qs), q5_high_bits(b.qh)); }
#endif
};

template <class K, int NC>
static void dot_blocks_ref(const typename K::Block* w, const BlockQ8A* const* x, int nb, float* out) {
    for (int c = 0; c < NC; c++) {
        float s = 0.0f;
        for (int i = 0; i < nb; i++) {
            int isum = 0;
            for (int j = 0; j < QK; j++) isum += K::weight(w[i], j) * x[c][i].qs[j];
            if constexpr (K::has_min)
                s += fp16_to_fp32(w[i].d) * x[c][i].d * (float)isum + fp16_to_fp32(w[i].m) * x[c][i].s;
            else
                s += fp16_to_fp32(w[i].d) * x[c][i].d * (float)isum;
        }
        out[c] = s;
    }
}

template <class K, int NC>
static void dot_blocks(const typename K::Block* w, const BlockQ8A* const* x, int nb, float* out) {
#ifdef VICUNA_AVX2
    __m256 acc[NC];
    float msum[NC];
    for (int c = 0; c < NC; c++) {
        acc[c] = _mm256_setzero_ps();
        msum[c] = 0.0f;
    }
    for (int i = 0; i < nb; i++) {
        __m256i wq = K::load(w[i]);
        float dw = fp16_to_fp32(w[i].d);
        for (int c = 0; c < NC; c++) {
            __m256i xq = _mm256_loadu_si256((const __m256i*)x[c][i].qs);
            __m256i p;
            if constexpr (K::is_unsigned) p = dot_u4i8x32(wq, xq);
            else p = dot_i8x32(wq, xq);
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[c][i].d), _mm256_cvtepi32_ps(p), acc[c]);
        }
        if constexpr (K::has_min) {
            float mw = fp16_to_fp32(w[i].m);
            for (int c = 0; c < NC; c++) msum[c] += mw * x[c][i].s;
        }
    }
    for (int c = 0; c < NC; c++) out[c] = hsum_f32x8(acc[c]) + msum[c];
#else
    dot_blocks_ref<K, NC>(w, x, nb, out);
#endif
}

// ----------------------------------------------------------------------------
// K-quant dot products, against BlockQ8K activations (one scale dx per 256)
//
// Q4_K/Q5_K, sub-block g (32 elements) with scale d sc_g and minimum dmin m_g:
//   sum_j (d sc_g q_j - dmin m_g) (dx qx_j) = d dx sum_g sc_g isum_g - dmin dx sum_g m_g (b_2g + b_2g+1)
// with isum_g the integer dot product of the sub-block and b the activation's 16-element sums.
// Q6_K, sub-block k (16 elements), scale d sc_k, quants q - 32 with q in 0..63:
//   d dx (sum_k sc_k isum_k - 32 sum_k sc_k b_k)
// Everything inside the parentheses is integer: in AVX2, maddubs (unsigned weight bytes times
// signed activation bytes, pairs summed to int16) and madd with the sub-block scales (to int32).
// Bounds: Q6_K's pairs reach 2 * 63 * 127 = 16002 < 2^15; the int32 sums stay below 2^27.

// Q4_K and Q5_K (five: the fifth bit of each quant from qh)
template <class Block, bool five, int NC>
static void dot_q45_K_ref(const Block* w, const BlockQ8K* const* x, int nsb, float* out) {
    for (int c = 0; c < NC; c++) {
        float s = 0.0f;
        for (int i = 0; i < nsb; i++) {
            const BlockQ8K& xb = x[c][i];
            int isum = 0, msum = 0;
            for (int g = 0; g < 8; g++) {
                int sc, m, part = 0;
                kq_scale_min(g, w[i].scales, &sc, &m);
                for (int l = 0; l < 32; l++) part += q45_quant<five>(w[i], g, l) * xb.qs[32 * g + l];
                isum += sc * part;
                msum += m * (xb.bsums[2 * g] + xb.bsums[2 * g + 1]);
            }
            s += fp16_to_fp32(w[i].d) * xb.d * (float)isum - fp16_to_fp32(w[i].dmin) * xb.d * (float)msum;
        }
        out[c] = s;
    }
}

template <int NC>
static void dot_q6_K_ref(const BlockQ6_K* w, const BlockQ8K* const* x, int nsb, float* out) {
    for (int c = 0; c < NC; c++) {
        float s = 0.0f;
        for (int i = 0; i < nsb; i++) {
            const BlockQ8K& xb = x[c][i];
            int isum = 0;
            for (int g = 0; g < 8; g++) {
                const uint8_t *ql = w[i].ql + 64 * (g / 4), *qh = w[i].qh + 32 * (g / 4);
                for (int h = 0; h < 2; h++) {
                    int part = 0;
                    for (int l = 16 * h; l < 16 * h + 16; l++) part += (q6_quant(ql, qh, g % 4, l) - 32) * xb.qs[32 * g + l];
                    isum += w[i].scales[2 * g + h] * part;
                }
            }
            s += fp16_to_fp32(w[i].d) * xb.d * (float)isum;
        }
        out[c] = s;
    }
}

#ifdef VICUNA_AVX2
// The 8 scales and 8 minimums of a Q4_K/Q5_K block (kq_scale_min) at once: as four 32-bit words,
// sc[0..3] = word 0 & 0x3f.., sc[4..7] = low nibbles of word 2 | top 2 bits of word 0 << 4,
// m[0..3] = word 1 & 0x3f.., m[4..7] = high nibbles of word 2 | top 2 bits of word 1 << 4.
// Returns the 8 scale bytes then the 8 minimum bytes.
static inline __m128i kq_scales_mins_u8(const uint8_t* s) {
    uint32_t u[3], v[4];
    memcpy(u, s, 12);
    v[0] = u[0] & 0x3f3f3f3fu;
    v[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    v[2] = u[1] & 0x3f3f3f3fu;
    v[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    return _mm_loadu_si128((const __m128i*)v);
}

// One kernel for Q4_K and Q5_K: 32 bytes of qs hold two sub-blocks (low and high nibbles);
// Q5_K ORs in bit g of each qh byte, moved to 0x10.
template <class Block, bool five, int NC>
static void dot_q45_K_avx2(const Block* w, const BlockQ8K* const* x, int nsb, float* out) {
    __m256 acc[NC];
    for (int c = 0; c < NC; c++) acc[c] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    // each minimum twice, for the 16-element sums: bytes 8, 8, 9, 9, ..., 15, 15
    const __m128i twice = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    for (int i = 0; i < nsb; i++) {
        const __m128i sm = kq_scales_mins_u8(w[i].scales);
        const __m256i mins2 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, twice));  // 16 x int16
        // the scales as int16 in both 128-bit lanes; sub-block g's in every lane is one byte shuffle
        const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
        __m256i scale_g[8];
        for (int g = 0; g < 8; g++) scale_g[g] = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(0x0100 + 0x0202 * g)));
        __m256i qh = _mm256_setzero_si256();
        if constexpr (five) qh = _mm256_loadu_si256((const __m256i*)((const BlockQ5_K*)&w[i])->qh);
        __m256i isum[NC];
        for (int c = 0; c < NC; c++) isum[c] = _mm256_setzero_si256();
        for (int p = 0; p < 4; p++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i*)(w[i].qs + 32 * p));
            __m256i q2[2] = {_mm256_and_si256(bytes, low4), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4)};
            for (int h = 0; h < 2; h++) {
                const int g = 2 * p + h;
                __m256i q = q2[h];
                if constexpr (five) {
                    const __m256i bit = _mm256_set1_epi8((char)(1 << g));
                    q = _mm256_or_si256(q, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit),
                                                            _mm256_set1_epi8(0x10)));
                }
                for (int c = 0; c < NC; c++) {
                    __m256i xq = _mm256_loadu_si256((const __m256i*)(x[c][i].qs + 32 * g));
                    isum[c] = _mm256_add_epi32(isum[c], _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), scale_g[g]));
                }
            }
        }
        const __m256 d = _mm256_set1_ps(fp16_to_fp32(w[i].d)), dmin = _mm256_set1_ps(fp16_to_fp32(w[i].dmin));
        for (int c = 0; c < NC; c++) {  // acc += dx (d isum - dmin msum)
            const BlockQ8K& xb = x[c][i];
            __m256i msum = _mm256_madd_epi16(mins2, _mm256_loadu_si256((const __m256i*)xb.bsums));
            __m256 f = _mm256_fmsub_ps(d, _mm256_cvtepi32_ps(isum[c]), _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(msum)));
            acc[c] = _mm256_fmadd_ps(_mm256_broadcast_ss(&xb.d), f, acc[c]);
        }
    }
    for (int c = 0; c < NC; c++) out[c] = hsum_f32x8(acc[c]);
}

template <int NC>
static void dot_q6_K_avx2(const BlockQ6_K* w, const BlockQ8K* const* x, int nsb, float* out) {
    __m256 acc[NC];
    for (int c = 0; c < NC; c++) acc[c] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f), high2 = _mm256_set1_epi8(0x30);
    // the int16 pair (scale 2g, scale 2g+1) of 32-bit word g, spread: low lane 2g, high lane 2g+1
    const __m256i pair_lo_hi = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,  //
                                                2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    for (int i = 0; i < nsb; i++) {
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)w[i].scales));  // 16 x int16
        __m256i isum[NC];
        for (int c = 0; c < NC; c++) {  // the -32 offset: -32 sum_k sc_k b_k
            __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i*)x[c][i].bsums));
            isum[c] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 5));
        }
        for (int k = 0; k < 2; k++) {
            __m256i ql0 = _mm256_loadu_si256((const __m256i*)(w[i].ql + 64 * k));
            __m256i ql1 = _mm256_loadu_si256((const __m256i*)(w[i].ql + 64 * k + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i*)(w[i].qh + 32 * k));
            // the four 32-groups of this 128: low nibbles of ql0, ql1, then their high nibbles;
            // the 2 high bits come from bits 0-1, 2-3, 4-5, 6-7 of qh, moved to bits 4-5
            __m256i q4[4] = {
                _mm256_or_si256(_mm256_and_si256(ql0, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), high2)),
                _mm256_or_si256(_mm256_and_si256(ql1, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), high2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4), _mm256_and_si256(qh, high2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                                _mm256_and_si256(_mm256_srli_epi16(qh, 2), high2))};
            for (int gg = 0; gg < 4; gg++) {
                const int g = 4 * k + gg;
                __m256i scales = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(sc16, _mm256_set1_epi32(g)), pair_lo_hi);
                for (int c = 0; c < NC; c++) {
                    __m256i xq = _mm256_loadu_si256((const __m256i*)(x[c][i].qs + 32 * g));
                    isum[c] = _mm256_add_epi32(isum[c], _mm256_madd_epi16(_mm256_maddubs_epi16(q4[gg], xq), scales));
                }
            }
        }
        const float d = fp16_to_fp32(w[i].d);
        for (int c = 0; c < NC; c++) acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d * x[c][i].d), _mm256_cvtepi32_ps(isum[c]), acc[c]);
    }
    for (int c = 0; c < NC; c++) out[c] = hsum_f32x8(acc[c]);
}
#endif

// one row of Q4_K, Q5_K or Q6_K against NC tokens: the AVX2 kernels, or the portable ones (always with ref)
template <int NC, bool ref>
static void dot_kquant(uint32_t type, const uint8_t* row, const BlockQ8K* const* x, int nsb, float* out) {
#ifdef VICUNA_AVX2
    if constexpr (!ref) {
        if (type == GGML_TYPE_Q4_K) dot_q45_K_avx2<BlockQ4_K, false, NC>((const BlockQ4_K*)row, x, nsb, out);
        else if (type == GGML_TYPE_Q5_K) dot_q45_K_avx2<BlockQ5_K, true, NC>((const BlockQ5_K*)row, x, nsb, out);
        else dot_q6_K_avx2<NC>((const BlockQ6_K*)row, x, nsb, out);
        return;
    }
#endif
    if (type == GGML_TYPE_Q4_K) dot_q45_K_ref<BlockQ4_K, false, NC>((const BlockQ4_K*)row, x, nsb, out);
    else if (type == GGML_TYPE_Q5_K) dot_q45_K_ref<BlockQ5_K, true, NC>((const BlockQ5_K*)row, x, nsb, out);
    else dot_q6_K_ref<NC>((const BlockQ6_K*)row, x, nsb, out);
}

// ----------------------------------------------------------------------------
// Q4_K rows repacked in groups of 8 (prefill). The row kernels above hold one row's 32 bytes of
// a sub-block in a register: after the byte products, every lane holds a piece of the same row's
// sum and each token pays a multiply by that row's scale (madd) per 32 elements. Here a register
// holds 4 bytes of each of 8 rows, so one product instruction (dpbusd with AVX-512 VNNI, else
// maddubs + madd) against 4 activation bytes broadcast leaves one row's partial sum per lane:
// no horizontal sums, and the scales of 8 rows are applied by one multiply per sub-block and
// token (VNNI) or folded into the madd (AVX2). Scales and minimums are unpacked once at repack
// time, d and dmin are stored as float. Built in memory (forward.h, on the first multiply of 4 or
// more tokens) next to the mmap'ed file, which decode keeps reading: 1280 bytes per 8 x 256
// weights against 1152 in the file (1.11x the Q4_K tensors, held in addition to the file).
struct BlockQ4_Kx8 {
    float d[8], dmin[8];        // row r's d and dmin
    uint8_t sc[8][8];           // [g][r]: scale of sub-block g of row r (6 bits)
    uint8_t m[8][8][2];         // [g][r][0..1]: its minimum, twice (multiplied into the two 16-sums)
    uint8_t qs[4][8][8][4];     // [p][k][r][4]: row r's qs[32p + 4k .. +4]: sub-block 2p low nibbles, 2p+1 high
};
static_assert(sizeof(BlockQ4_Kx8) == 1280, "BlockQ4_Kx8 layout");

// row r's d, dmin, scales and minimums of a Q4_K or Q5_K block b into the repacked block o
template <class BlockX8, class Block>
static inline void repack_q45_K_scales(const Block& b, int r, BlockX8& o) {
    o.d[r] = fp16_to_fp32(b.d);
    o.dmin[r] = fp16_to_fp32(b.dmin);
    for (int g = 0; g < 8; g++) {
        int sc, m;
        kq_scale_min(g, b.scales, &sc, &m);
        o.sc[g][r] = (uint8_t)sc;
        o.m[g][r][0] = o.m[g][r][1] = (uint8_t)m;
    }
}

// rows 8G..8G+8 of a Q4_K matrix (row_bytes apart) into nsb blocks
static void repack_q4_K_x8(const uint8_t* rows8, size_t row_bytes, int nsb, BlockQ4_Kx8* y) {
    for (int i = 0; i < nsb; i++) {
        BlockQ4_Kx8& o = y[i];
        for (int r = 0; r < 8; r++) {
            const BlockQ4_K& b = ((const BlockQ4_K*)(rows8 + (size_t)r * row_bytes))[i];
            repack_q45_K_scales(b, r, o);
            for (int p = 0; p < 4; p++)
                for (int k = 0; k < 8; k++) memcpy(o.qs[p][k][r], b.qs + 32 * p + 4 * k, 4);
        }
    }
}

// Q5_K rows repacked in groups of 8: Q4_K's scales and minimums, the 5-bit quants stored whole,
// one byte each (Q6_K's layout, below). 2304 bytes per 8 x 256 weights against 1408 in the file (1.64x
// the Q5_K tensors, held in addition to the file).
struct BlockQ5_Kx8 {
    float d[8], dmin[8];
    uint8_t sc[8][8];          // [g][r]
    uint8_t m[8][8][2];        // [g][r][0..1]
    uint8_t q[8][8][8][4];     // [g][k][r][4]: row r's quants (0..31) of elements 32g + 4k .. +4
};
static_assert(sizeof(BlockQ5_Kx8) == 2304, "BlockQ5_Kx8 layout");

static void repack_q5_K_x8(const uint8_t* rows8, size_t row_bytes, int nsb, BlockQ5_Kx8* y) {
    for (int i = 0; i < nsb; i++) {
        BlockQ5_Kx8& o = y[i];
        for (int r = 0; r < 8; r++) {
            const BlockQ5_K& b = ((const BlockQ5_K*)(rows8 + (size_t)r * row_bytes))[i];
            repack_q45_K_scales(b, r, o);
            for (int g = 0; g < 8; g++)
                for (int l = 0; l < 32; l++) o.q[g][l / 4][r][l % 4] = (uint8_t)q45_quant<true>(b, g, l);
        }
    }
}

// Q4_K and Q5_K repacked share everything but the quants: kx8_quant reads quant l (0..31) of
// sub-block g of row r, kx8_isums_avx2 adds block i's integer sums sum_g sc_g isum_g of each
// token to iacc (one lane per row).
static inline int kx8_quant(const BlockQ4_Kx8& b, int g, int l, int r) {
    return (b.qs[g / 2][l / 4][r][l % 4] >> (4 * (g % 2))) & 0xf;
}
static inline int kx8_quant(const BlockQ5_Kx8& b, int g, int l, int r) { return b.q[g][l / 4][r][l % 4]; }

// out[c * ld + r] = row r . token c for the 8 rows of w (nsb blocks), tokens x[0..NC). The portable
// twin of dot_Kx8_avx2: integer sums, then per block acc = fma(dx d, isum, acc), acc = fma(-dx dmin,
// msum, acc) in the same order, so both give the same floats.
template <class BlockX8, int NC>
static void dot_q45_Kx8_ref(const BlockX8* w, const BlockQ8K* const* x, int nsb, float* out, size_t ld) {
    for (int c = 0; c < NC; c++) {
        for (int r = 0; r < 8; r++) {
            float acc = 0.0f;
            for (int i = 0; i < nsb; i++) {
                const BlockQ8K& xb = x[c][i];
                int isum = 0, msum = 0;
                for (int g = 0; g < 8; g++) {
                    int part = 0;
                    for (int l = 0; l < 32; l++) part += kx8_quant(w[i], g, l, r) * xb.qs[32 * g + l];
                    isum += w[i].sc[g][r] * part;
                    msum += w[i].m[g][r][0] * (xb.bsums[2 * g] + xb.bsums[2 * g + 1]);
                }
                acc = std::fmaf(xb.d * w[i].d[r], (float)isum, acc);
                acc = std::fmaf(-(xb.d * w[i].dmin[r]), (float)msum, acc);
            }
            out[(size_t)c * ld + r] = acc;
        }
    }
}

#ifdef VICUNA_AVX2
// The integer sums of 8 rows (a row per lane) for each token c: the quant bytes q0 against the 4
// activation bytes of block i at element e, q1 against those at e + off.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
// is0[c] and is1[c] get the two unscaled sums (dpbusd)
template <int NC>
static inline __attribute__((always_inline)) void kx8_dpbusd2(__m256i q0, __m256i q1, const BlockQ8K* const* x, int i, int e, int off, __m256i* is0, __m256i* is1) {
    for (int c = 0; c < NC; c++) {
        const int8_t* xq = x[c][i].qs + e;
        is0[c] = _mm256_dpbusd_epi32(is0[c], q0, _mm256_set1_epi32(*(const int32_t*)xq));
        is1[c] = _mm256_dpbusd_epi32(is1[c], q1, _mm256_set1_epi32(*(const int32_t*)(xq + off)));
    }
}

// 32-group G of block i (Q5_K and Q6_K repacked, the quants one byte each: q[k][r][4], elements
// 4k..4k+4 of row r): is0[c] gets elements 0..15, is1[c] 16..31
template <int NC>
static inline __attribute__((always_inline)) void kx8_dpbusd_q32(const uint8_t (*q)[8][4], const BlockQ8K* const* x, int i, int G, __m256i* is0, __m256i* is1) {
    for (int c = 0; c < NC; c++) is0[c] = is1[c] = _mm256_setzero_si256();
    for (int k = 0; k < 4; k++)
        kx8_dpbusd2<NC>(_mm256_loadu_si256((const __m256i*)q[k]), _mm256_loadu_si256((const __m256i*)q[k + 4]), x, i,
                        32 * G + 4 * k, 16, is0, is1);
}
#else
// iacc[c] gets both sums times the scales sc0, sc1 (int16 in both halves of each row's lane):
// maddubs to int16 pairs, madd with the scales to int32
template <int NC>
static inline __attribute__((always_inline)) void kx8_maddubs2(__m256i q0, __m256i q1, __m256i sc0, __m256i sc1, const BlockQ8K* const* x, int i, int e, int off,
                         __m256i* iacc) {
    for (int c = 0; c < NC; c++) {
        const int8_t* xq = x[c][i].qs + e;
        __m256i s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(q0, _mm256_set1_epi32(*(const int32_t*)xq)), sc0);
        __m256i s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(q1, _mm256_set1_epi32(*(const int32_t*)(xq + off))), sc1);
        iacc[c] = _mm256_add_epi32(iacc[c], _mm256_add_epi32(s0, s1));
    }
}
#endif


template <int NC>
static inline __attribute__((always_inline)) void kx8_isums_avx2(const BlockQ4_Kx8& b, const BlockQ8K* const* x, int i, __m256i* iacc) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int p = 0; p < 4; p++) {
        __m256i sc0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)b.sc[2 * p]));
        __m256i sc1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)b.sc[2 * p + 1]));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        __m256i is0[NC], is1[NC];
        for (int c = 0; c < NC; c++) is0[c] = is1[c] = _mm256_setzero_si256();
        for (int k = 0; k < 8; k++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i*)b.qs[p][k]);
            __m256i q0 = _mm256_and_si256(bytes, low4), q1 = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
            kx8_dpbusd2<NC>(q0, q1, x, i, 64 * p + 4 * k, 32, is0, is1);
        }
        for (int c = 0; c < NC; c++)
            iacc[c] = _mm256_add_epi32(iacc[c], _mm256_add_epi32(_mm256_mullo_epi32(is0[c], sc0),
                                                                 _mm256_mullo_epi32(is1[c], sc1)));
#else
        // the scale in both int16 halves of each row's 32-bit lane: madd applies it to both pairs
        sc0 = _mm256_or_si256(sc0, _mm256_slli_epi32(sc0, 16));
        sc1 = _mm256_or_si256(sc1, _mm256_slli_epi32(sc1, 16));
        for (int k = 0; k < 8; k++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i*)b.qs[p][k]);
            __m256i q0 = _mm256_and_si256(bytes, low4), q1 = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
            kx8_maddubs2<NC>(q0, q1, sc0, sc1, x, i, 64 * p + 4 * k, 32, iacc);
        }
#endif
    }
}

template <int NC>
static inline __attribute__((always_inline)) void kx8_isums_avx2(const BlockQ5_Kx8& b, const BlockQ8K* const* x, int i, __m256i* iacc) {
    for (int g = 0; g < 8; g++) {
        __m256i sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)b.sc[g]));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        __m256i is0[NC], is1[NC];
        kx8_dpbusd_q32<NC>(b.q[g], x, i, g, is0, is1);
        for (int c = 0; c < NC; c++)
            iacc[c] = _mm256_add_epi32(iacc[c], _mm256_mullo_epi32(_mm256_add_epi32(is0[c], is1[c]), sc));
#else
        sc = _mm256_or_si256(sc, _mm256_slli_epi32(sc, 16));
        for (int k = 0; k < 8; k++) {
            __m256i q = _mm256_loadu_si256((const __m256i*)b.q[g][k]);
            for (int c = 0; c < NC; c++) {
                const int8_t* xq = x[c][i].qs + 32 * g + 4 * k;
                iacc[c] = _mm256_add_epi32(iacc[c], _mm256_madd_epi16(_mm256_maddubs_epi16(q, _mm256_set1_epi32(*(const int32_t*)xq)), sc));
            }
        }
#endif
    }
}

// Q4_K/Q5_K: acc[c] += dx d iacc[c] - dx dmin msum, msum from the minimums and the token's bsums
template <int NC, class BlockX8>
static inline __attribute__((always_inline)) void kx8_accumulate_avx2(const BlockX8& b, const BlockQ8K* const* x, int i, const __m256i* iacc, __m256* acc) {
    __m256i m16[8];  // row r's minimum of sub-block g twice, as int16 pairs
    for (int g = 0; g < 8; g++) m16[g] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)b.m[g]));
    const __m256 d = _mm256_loadu_ps(b.d), dmin = _mm256_loadu_ps(b.dmin);
    for (int c = 0; c < NC; c++) {
        const BlockQ8K& xb = x[c][i];
        __m256i msum = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++)
            msum = _mm256_add_epi32(msum, _mm256_madd_epi16(m16[g], _mm256_set1_epi32(*(const int32_t*)(xb.bsums + 2 * g))));
        const __m256 dx = _mm256_set1_ps(xb.d);
        acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dx, d), _mm256_cvtepi32_ps(iacc[c]), acc[c]);
        acc[c] = _mm256_fnmadd_ps(_mm256_mul_ps(dx, dmin), _mm256_cvtepi32_ps(msum), acc[c]);
    }
}
#endif

// Q6_K rows repacked in groups of 8 the same way: the 6-bit quants stored whole, one byte each
// (no unpacking left in the kernel), the int8 scales spread per row. 2336 bytes per 8 x 256
// weights against 1680 in the file (1.39x the Q6_K tensors, held in addition to the file).
struct BlockQ6_Kx8 {
    float d[8];
    int8_t sc[16][8];        // [s][r]: scale of the 16 elements s of row r
    int8_t scp[8][8][2];     // [j][r][0..1]: scales 2j and 2j+1 of row r (the -32 offset's madd)
    uint8_t q[8][8][8][4];   // [G][k][r][4]: row r's quants (0..63) of elements 32G + 4k .. +4
};
static_assert(sizeof(BlockQ6_Kx8) == 2336, "BlockQ6_Kx8 layout");

static void repack_q6_K_x8(const uint8_t* rows8, size_t row_bytes, int nsb, BlockQ6_Kx8* y) {
    for (int i = 0; i < nsb; i++) {
        BlockQ6_Kx8& o = y[i];
        for (int r = 0; r < 8; r++) {
            const BlockQ6_K& b = ((const BlockQ6_K*)(rows8 + (size_t)r * row_bytes))[i];
            o.d[r] = fp16_to_fp32(b.d);
            for (int s = 0; s < 16; s++) o.sc[s][r] = b.scales[s];
            for (int j = 0; j < 8; j++) o.scp[j][r][0] = b.scales[2 * j], o.scp[j][r][1] = b.scales[2 * j + 1];
            for (int e = 0; e < QK_K; e++) {
                const int c = e / 128, g = (e % 128) / 32, l = e % 32;
                o.q[e / 32][(e % 32) / 4][r][e % 4] = (uint8_t)q6_quant(b.ql + 64 * c, b.qh + 32 * c, g, l);
            }
        }
    }
}

template <int NC>
static void dot_q6_Kx8_ref(const BlockQ6_Kx8* w, const BlockQ8K* const* x, int nsb, float* out, size_t ld) {
    for (int c = 0; c < NC; c++) {
        for (int r = 0; r < 8; r++) {
            float acc = 0.0f;
            for (int i = 0; i < nsb; i++) {
                const BlockQ8K& xb = x[c][i];
                int isum = 0, msum = 0;
                for (int s = 0; s < 16; s++) {
                    int part = 0;
                    for (int l = 16 * s; l < 16 * s + 16; l++) part += w[i].q[l / 32][(l % 32) / 4][r][l % 4] * xb.qs[l];
                    isum += w[i].sc[s][r] * part;
                    msum += w[i].sc[s][r] * xb.bsums[s];
                }
                acc = std::fmaf(xb.d * w[i].d[r], (float)(isum - 32 * msum), acc);
            }
            out[(size_t)c * ld + r] = acc;
        }
    }
}

#ifdef VICUNA_AVX2
template <int NC>
static inline __attribute__((always_inline)) void kx8_isums_avx2(const BlockQ6_Kx8& b, const BlockQ8K* const* x, int i, __m256i* iacc) {
    for (int G = 0; G < 8; G++) {
        __m256i sca = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)b.sc[2 * G]));
        __m256i scb = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)b.sc[2 * G + 1]));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        __m256i is0[NC], is1[NC];
        kx8_dpbusd_q32<NC>(b.q[G], x, i, G, is0, is1);
        for (int c = 0; c < NC; c++)
            iacc[c] = _mm256_add_epi32(iacc[c], _mm256_add_epi32(_mm256_mullo_epi32(is0[c], sca),
                                                                 _mm256_mullo_epi32(is1[c], scb)));
#else
        const __m256i lo16 = _mm256_set1_epi32(0xffff);
        sca = _mm256_or_si256(_mm256_and_si256(sca, lo16), _mm256_slli_epi32(sca, 16));
        scb = _mm256_or_si256(_mm256_and_si256(scb, lo16), _mm256_slli_epi32(scb, 16));
        for (int k = 0; k < 4; k++)
            kx8_maddubs2<NC>(_mm256_loadu_si256((const __m256i*)b.q[G][k]), _mm256_loadu_si256((const __m256i*)b.q[G][k + 4]),
                             sca, scb, x, i, 32 * G + 4 * k, 16, iacc);
#endif
    }
}

// Q6_K: acc[c] += dx d (iacc[c] - 32 sum_k sc_k b_k)
template <int NC>
static inline __attribute__((always_inline)) void kx8_accumulate_avx2(const BlockQ6_Kx8& b, const BlockQ8K* const* x, int i, const __m256i* iacc, __m256* acc) {
    __m256i scp[8];  // scales 2j, 2j+1 of each row as int16 pairs
    for (int j = 0; j < 8; j++) scp[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)b.scp[j]));
    const __m256 d = _mm256_loadu_ps(b.d);
    for (int c = 0; c < NC; c++) {
        const BlockQ8K& xb = x[c][i];
        __m256i msum = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++)
            msum = _mm256_add_epi32(msum, _mm256_madd_epi16(scp[j], _mm256_set1_epi32(*(const int32_t*)(xb.bsums + 2 * j))));
        __m256i isum = _mm256_sub_epi32(iacc[c], _mm256_slli_epi32(msum, 5));
        acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(xb.d), d), _mm256_cvtepi32_ps(isum), acc[c]);
    }
}

// out[c * ld + r] = row r . token c for the 8 rows of w (nsb blocks), tokens x[0..NC), for each
// repacked type: its integer sums (kx8_isums_avx2), then its scales (kx8_accumulate_avx2)
template <int NC, class BlockX8>
static void dot_Kx8_avx2(const BlockX8* w, const BlockQ8K* const* x, int nsb, float* out, size_t ld) {
    __m256 acc[NC];
    for (int c = 0; c < NC; c++) acc[c] = _mm256_setzero_ps();
    for (int i = 0; i < nsb; i++) {
        __m256i iacc[NC];
        for (int c = 0; c < NC; c++) iacc[c] = _mm256_setzero_si256();
        kx8_isums_avx2<NC>(w[i], x, i, iacc);
        kx8_accumulate_avx2<NC>(w[i], x, i, iacc, acc);
    }
    for (int c = 0; c < NC; c++) _mm256_storeu_ps(out + (size_t)c * ld, acc[c]);
}
#endif

// the repacked kernels by type (forward.h): `packed` holds the 8-row groups of one matrix
// one packed type: the AVX2 kernel, or the portable one (always with ref)
template <int NC, bool ref, class BlockX8>
static void dot_Kx8(const uint8_t* packed, int64_t group, const BlockQ8K* const* x, int nsb, float* out, size_t ld) {
    const BlockX8* w = (const BlockX8*)packed + (size_t)group * nsb;
#ifdef VICUNA_AVX2
    if constexpr (!ref) {
        dot_Kx8_avx2<NC>(w, x, nsb, out, ld);
        return;
    }
#endif
    if constexpr (std::is_same_v<BlockX8, BlockQ6_Kx8>) dot_q6_Kx8_ref<NC>(w, x, nsb, out, ld);
    else dot_q45_Kx8_ref<BlockX8, NC>(w, x, nsb, out, ld);
}

template <int NC, bool ref = false>
static void dot_packed_x8(uint32_t type, const uint8_t* packed, int64_t group, const BlockQ8K* const* x, int nsb,
                          float* out, size_t ld) {
    if (type == GGML_TYPE_Q4_K) dot_Kx8<NC, ref, BlockQ4_Kx8>(packed, group, x, nsb, out, ld);
    else if (type == GGML_TYPE_Q5_K) dot_Kx8<NC, ref, BlockQ5_Kx8>(packed, group, x, nsb, out, ld);
    else dot_Kx8<NC, ref, BlockQ6_Kx8>(packed, group, x, nsb, out, ld);
}

// Q2_K and Q3_K (read for completeness; llama.cpp's q2_k/q3_k mixes) take the float path: the
// row is dequantized into a per-thread buffer, then dotted with the f32 activations.
template <int NC, bool ref>
static void dot_dequant_f32(uint32_t type, const uint8_t* row, const float* const* x, int n, float* out) {
    thread_local std::vector<float> buf;
    if ((int)buf.size() < n) buf.resize((size_t)n);
    dequantize_row(type, row, buf.data(), n);
    if constexpr (ref) dot_f32_ref<NC>(buf.data(), x, n, out);
    else dot_f32<NC>(buf.data(), x, n, out);
}

// ----------------------------------------------------------------------------
// elementwise math

#ifdef VICUNA_AVX2
// e^x for 8 floats: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial (relative
// error ~2e-7), 2^n put straight into the exponent bits.
static inline __m256 exp_f32x8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// x[i] = silu(x[i]) * y[i], the SwiGLU gate
static void vec_swiglu(float* x, const float* y, int n) {
    int i = 0;
#ifdef VICUNA_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 e = exp_f32x8(_mm256_sub_ps(_mm256_setzero_ps(), v));
        __m256 s = _mm256_div_ps(v, _mm256_add_ps(one, e));
        _mm256_storeu_ps(x + i, _mm256_mul_ps(s, _mm256_loadu_ps(y + i)));
    }
#endif
    for (; i < n; i++) x[i] = x[i] / (1.0f + std::exp(-x[i])) * y[i];
}

// x = softmax(x) in place
static void vec_softmax(float* x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) max = std::max(max, x[i]);
    int i = 0;
    float sum = 0.0f;
#ifdef VICUNA_AVX2
    __m256 vmax = _mm256_set1_ps(max), vsum = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_f32x8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmax));
        _mm256_storeu_ps(x + i, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    sum = hsum_f32x8(vsum);
#endif
    for (; i < n; i++) {
        x[i] = std::exp(x[i] - max);
        sum += x[i];
    }
    float inv = 1.0f / sum;
    for (i = 0; i < n; i++) x[i] *= inv;
}

// out (n,) = sum_t w[t] * v[t] for rows v[t] (n,) of a row-major (n_rows, n) matrix; the output
// strip stays in registers while the rows stream past (attention's weighted sum of values).
static void vec_weighted_sum(float* out, const float* w, const float* v, int n_rows, int n) {
    int j = 0;
#ifdef VICUNA_AVX2
    for (; j + 32 <= n; j += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int t = 0; t < n_rows; t++) {
            const float* r = v + (size_t)t * n + j;
            __m256 wt = _mm256_broadcast_ss(w + t);
            a0 = _mm256_fmadd_ps(wt, _mm256_loadu_ps(r), a0);
            a1 = _mm256_fmadd_ps(wt, _mm256_loadu_ps(r + 8), a1);
            a2 = _mm256_fmadd_ps(wt, _mm256_loadu_ps(r + 16), a2);
            a3 = _mm256_fmadd_ps(wt, _mm256_loadu_ps(r + 24), a3);
        }
        _mm256_storeu_ps(out + j, a0);
        _mm256_storeu_ps(out + j + 8, a1);
        _mm256_storeu_ps(out + j + 16, a2);
        _mm256_storeu_ps(out + j + 24, a3);
    }
#endif
    for (; j < n; j++) {
        float acc = 0.0f;
        for (int t = 0; t < n_rows; t++) acc += w[t] * v[(size_t)t * n + j];
        out[j] = acc;
    }
}
