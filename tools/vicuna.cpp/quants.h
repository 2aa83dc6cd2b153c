// quants.h: quantized block formats, the reference quantizers, and the dot-product kernels.
//
// Weights: GGUF's 32-element blocks, byte for byte as ggml defines them.
//   Q8_0  34 bytes  x[j] = d * qs[j]                      qs int8
//   Q4_0  18 bytes  x[j] = d * (q[j] - 8)                 q 4-bit, unsigned
//   Q4_1  20 bytes  x[j] = d * q[j] + m                   q 4-bit, unsigned
// In the 4-bit formats byte qs[j] holds element j in its low nibble and element j+16 in its high
// nibble. d and m are fp16.
//
// Activations: before a matmul with quantized weights, each activation row is quantized to
// BlockQ8A (int8 with a float scale, like ggml's Q8_0/Q8_1), so every block's dot product runs
// in int8 with int32 accumulation: 32 multiply-adds per AVX2 instruction instead of 8 in f32.
// This costs some accuracy (about 1e-2 relative on logits); models stored as F32/F16 take the
// float path instead, which is what the 1e-3 tests against transformers use.
#pragma once

#include <algorithm>
#include <cmath>

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
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block must be 34 bytes as in GGUF");
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

static void quantize_row_q4_0(const float* x, BlockQ4_0* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; b++, x += QK) {
        float amax = 0.0f, max = 0.0f;  // the element of largest magnitude, with its sign
        for (int j = 0; j < QK; j++) {
            if (amax < std::fabs(x[j])) {
                amax = std::fabs(x[j]);
                max = x[j];
            }
        }
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
        float min = x[0], max = x[0];
        for (int j = 1; j < QK; j++) {
            min = std::min(min, x[j]);
            max = std::max(max, x[j]);
        }
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

// Quantizes one row of n floats (n % 32 == 0 for the block types) to `type`.
static void quantize_row(uint32_t type, const float* x, void* y, int64_t n) {
    switch (type) {
        case GGML_TYPE_F32: memcpy(y, x, (size_t)n * 4); break;
        case GGML_TYPE_F16:
            for (int64_t i = 0; i < n; i++) ((uint16_t*)y)[i] = fp32_to_fp16(x[i]);
            break;
        case GGML_TYPE_Q8_0: quantize_row_q8_0(x, (BlockQ8_0*)y, n); break;
        case GGML_TYPE_Q4_0: quantize_row_q4_0(x, (BlockQ4_0*)y, n); break;
        case GGML_TYPE_Q4_1: quantize_row_q4_1(x, (BlockQ4_1*)y, n); break;
        default: FAIL("cannot quantize to type %u", type);
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
