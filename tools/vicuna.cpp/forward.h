// forward.h: running the model: key/value cache, activations, matmul, attention, forward_batch.
//
// One forward_batch runs B tokens through every layer at once (prefill) or one (decode):
//   x = embed(tokens)
//   per layer:  x += wo @ attention(rope(wq @ norm(x) + bq), rope(wk @ norm(x) + bk), wv @ norm(x) + bv)
//               x += w_down @ (silu(w_gate @ norm(x)) * (w_up @ norm(x)))
//   logits = output @ norm(x)
// The matmuls and the attention are split over the thread pool; quantized weights multiply int8
// activation blocks (quants.h). A weight with a LoRA pair attached (lora.h) adds scale * B (A x)
// inside the same dispatch.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "common.h"
#include "lora.h"
#include "model.h"
#include "quants.h"
#include "threadpool.h"

// ----------------------------------------------------------------------------
// key/value cache and scratch buffers

// One kv head's keys (and values) are contiguous, a row per position: attention streams them.
struct KVCache {
    int n_ctx = 0;
    int n_kv_heads = 0, head_dim = 0;
    std::vector<float> k;  // (n_layers, n_kv_heads, n_ctx, head_dim)
    std::vector<float> v;  // (n_layers, n_kv_heads, n_ctx, head_dim)
};

static void kv_cache_init(KVCache* kv, const Config* c, int n_ctx) {
    kv->n_ctx = n_ctx;
    kv->n_kv_heads = c->n_kv_heads;
    kv->head_dim = c->head_dim;
    kv->k.assign((size_t)c->n_layers * c->n_kv_heads * n_ctx * c->head_dim, 0.0f);
    kv->v.assign((size_t)c->n_layers * c->n_kv_heads * n_ctx * c->head_dim, 0.0f);
}

// (n_ctx, head_dim) keys of one layer and kv head
static float* kv_keys(KVCache* kv, int layer, int head) {
    return kv->k.data() + ((size_t)layer * kv->n_kv_heads + head) * (size_t)kv->n_ctx * kv->head_dim;
}
// (n_ctx, head_dim) values of one layer and kv head
static float* kv_values(KVCache* kv, int layer, int head) {
    return kv->v.data() + ((size_t)layer * kv->n_kv_heads + head) * (size_t)kv->n_ctx * kv->head_dim;
}

static void kv_cache_free(KVCache* kv) { *kv = KVCache(); }

// Activations for a batch of up to max_batch tokens processed together (prefill) or one (decode).
struct RunState {
    int max_batch = 0;
    std::vector<float> x;         // (B, dim) residual stream
    std::vector<float> xb;        // (B, dim) normed input of a sublayer / its output
    std::vector<float> xb2;       // (B, n_heads*head_dim) attention output, before wo
    std::vector<float> q;         // (B, n_heads*head_dim)
    std::vector<float> k, v;      // (B, n_kv_heads*head_dim)
    std::vector<float> hb, hb2;   // (B, hidden_dim) SwiGLU gate and up projections
    std::vector<float> att;       // (n_threads, n_heads, n_ctx) attention weights per thread
    std::vector<float> rope_cos;  // (B, rope_dim/2)
    std::vector<float> rope_sin;  // (B, rope_dim/2)
    std::vector<BlockQ8A> xq;     // (B, max(dim, q_dim, hidden_dim)/32) quantized matmul input
    std::vector<BlockQ8K> xqk;    // (B, max(dim, q_dim, hidden_dim)/256) the same for K-quant weights
    std::vector<float> logits;    // (B, vocab)
    std::vector<float> lora_t;    // (B, rank) A x of each LoRA pair in one matmul; sized on first use
};

static void state_init(RunState* s, const Config* c, int max_batch, int n_ctx, int n_threads) {
    size_t B = (size_t)max_batch;
    int q_dim = c->n_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    s->max_batch = max_batch;
    s->x.assign(B * c->dim, 0.0f);
    s->xb.assign(B * std::max(c->dim, q_dim), 0.0f);
    s->xb2.assign(B * q_dim, 0.0f);
    s->q.assign(B * q_dim, 0.0f);
    s->k.assign(B * kv_dim, 0.0f);
    s->v.assign(B * kv_dim, 0.0f);
    s->hb.assign(B * c->hidden_dim, 0.0f);
    s->hb2.assign(B * c->hidden_dim, 0.0f);
    s->att.assign((size_t)n_threads * c->n_heads * n_ctx, 0.0f);
    s->rope_cos.assign(B * (c->rope_dim / 2), 0.0f);
    s->rope_sin.assign(B * (c->rope_dim / 2), 0.0f);
    int max_in = std::max(std::max(c->dim, q_dim), c->hidden_dim);
    s->xq.resize(B * ((max_in + QK - 1) / QK));
    s->xqk.resize(B * ((max_in + QK_K - 1) / QK_K));
    s->logits.assign(B * c->vocab_size, 0.0f);
}

static void state_free(RunState* s) { *s = RunState(); }

// ----------------------------------------------------------------------------
// matmul: out (B, rows) = x (B, cols) @ W^T, for up to three weights sharing one input
//
// The rows of all jobs are cut into chunks that the threads take from an atomic counter, so
// one dispatch covers q, k and v (or gate and up) and a slow thread does not hold up the rest.
//
// A weight with a LoRA pair (W.lora, lora.h) adds scale * B (A x): the products t = A x are extra
// jobs whose chunks come first in the counter's order, and the chunk that computes rows r0..r1 of
// W x adds scale * B[r] . t to them, after waiting for the last A chunk (handed out before any W
// chunk, so the wait is short or none). No extra dispatch, no pass over `out` afterwards.

struct MatJob {
    const Tensor* w;
    float* out;  // (B, w->rows)
    const float* lora_t = nullptr;  // (B, rank) A x when w has a LoRA pair
};

static const int MATMUL_MAX_JOBS = 6;
#ifdef __AVX512VL__
static const int Q4_KX8_TOKENS = 8;  // tokens a repacked Q4_K call keeps in registers (32 of them)
#else
static const int Q4_KX8_TOKENS = 4;  // 16 registers
#endif  // three weights and their LoRA A products

struct MatmulTask {
    MatJob jobs[MATMUL_MAX_JOBS];  // the LoRA A products first, then the weights
    int n_jobs = 0;
    int chunk_rows[MATMUL_MAX_JOBS];
    int chunk_end[MATMUL_MAX_JOBS];  // cumulative chunk counts
    int lora_chunks = 0;             // chunks of the A products: [0, lora_chunks) of the counter
    const float* x;       // (B, cols)
    const BlockQ8A* xq;   // (B, cols/32), when a weight has a 32-element block type
    const BlockQ8K* xqk;  // (B, cols/256), when a weight is Q4_K/Q5_K/Q6_K
    int B, cols;
    std::atomic<int> next{0};
    std::atomic<int> lora_done{0};   // A chunks finished
};

template <int NC>
static inline void dot_row(uint32_t type, const uint8_t* row, const float* x, const BlockQ8A* xq,
                           const BlockQ8K* xqk, int b, int cols, float* out) {
    if (type == GGML_TYPE_F32 || type == GGML_TYPE_F16) {
        const float* xs[NC];
        for (int c = 0; c < NC; c++) xs[c] = x + (size_t)(b + c) * cols;
        if (type == GGML_TYPE_F32) dot_f32<NC>((const float*)row, xs, cols, out);
        else dot_f16<NC>((const uint16_t*)row, xs, cols, out);
        return;
    }
    if (type == GGML_TYPE_Q2_K || type == GGML_TYPE_Q3_K) {  // the float path (quants.h)
        const float* xs[NC];
        for (int c = 0; c < NC; c++) xs[c] = x + (size_t)(b + c) * cols;
        dot_dequant_f32<NC, false>(type, row, xs, cols, out);
        return;
    }
    if (type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q5_K || type == GGML_TYPE_Q6_K) {
        const int nsb = cols / QK_K;
        const BlockQ8K* xs[NC];
        for (int c = 0; c < NC; c++) xs[c] = xqk + (size_t)(b + c) * nsb;
        dot_kquant<NC, false>(type, row, xs, nsb, out);
        return;
    }
    int nb = cols / QK;
    const BlockQ8A* xs[NC];
    for (int c = 0; c < NC; c++) xs[c] = xq + (size_t)(b + c) * nb;
    switch (type) {
        case GGML_TYPE_Q8_0: dot_blocks<Q8_0Kind, NC>((const BlockQ8_0*)row, xs, nb, out); break;
        case GGML_TYPE_Q4_0: dot_blocks<Q4_0Kind, NC>((const BlockQ4_0*)row, xs, nb, out); break;
        case GGML_TYPE_Q4_1: dot_blocks<Q4_1Kind, NC>((const BlockQ4_1*)row, xs, nb, out); break;
        case GGML_TYPE_Q5_0: dot_blocks<Q5_0Kind, NC>((const BlockQ5_0*)row, xs, nb, out); break;
        case GGML_TYPE_Q5_1: dot_blocks<Q5_1Kind, NC>((const BlockQ5_1*)row, xs, nb, out); break;
    }
}

// the same with the portable kernels (the unit test's reference)
template <int NC>
[[maybe_unused]] static void dot_row_ref(uint32_t type, const uint8_t* row, const float* x, const BlockQ8A* xq,
                                         const BlockQ8K* xqk, int b, int cols, float* out) {
    const float* xs[NC];
    const BlockQ8A* xqs[NC];
    const BlockQ8K* xks[NC];
    for (int c = 0; c < NC; c++) {
        xs[c] = x + (size_t)(b + c) * cols;
        xqs[c] = xq + (size_t)(b + c) * (cols / QK);
        xks[c] = xqk + (size_t)(b + c) * (cols / QK_K);
    }
    switch (type) {
        case GGML_TYPE_F32: dot_f32_ref<NC>((const float*)row, xs, cols, out); break;
        case GGML_TYPE_F16: dot_f16_ref<NC>((const uint16_t*)row, xs, cols, out); break;
        case GGML_TYPE_Q8_0: dot_blocks_ref<Q8_0Kind, NC>((const BlockQ8_0*)row, xqs, cols / QK, out); break;
        case GGML_TYPE_Q4_0: dot_blocks_ref<Q4_0Kind, NC>((const BlockQ4_0*)row, xqs, cols / QK, out); break;
        case GGML_TYPE_Q4_1: dot_blocks_ref<Q4_1Kind, NC>((const BlockQ4_1*)row, xqs, cols / QK, out); break;
        case GGML_TYPE_Q5_0: dot_blocks_ref<Q5_0Kind, NC>((const BlockQ5_0*)row, xqs, cols / QK, out); break;
        case GGML_TYPE_Q5_1: dot_blocks_ref<Q5_1Kind, NC>((const BlockQ5_1*)row, xqs, cols / QK, out); break;
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K:
        case GGML_TYPE_Q6_K: dot_kquant<NC, true>(type, row, xks, cols / QK_K, out); break;
        case GGML_TYPE_Q2_K:
        case GGML_TYPE_Q3_K: dot_dequant_f32<NC, true>(type, row, xs, cols, out); break;
    }
}

// LoRA kernels. Decode multiplies one token by A (rank rows), so lora_a_rows runs four rows at
// once with two accumulators each (eight FMA chains in flight, where one dot product alone would
// wait on its single chain). B t reads B in its panels of 8 rows (LoraWeight): for each panel,
// rank broadcast multiply-adds into 8 outputs held in a register, four panels at a time: no
// horizontal sums, and the rows of a chunk are one contiguous run of memory.

static inline float lora_load(const Tensor* t, size_t i) {  // element i of F32/F16 data
    return t->type == GGML_TYPE_F32 ? ((const float*)t->data)[i] : fp16_to_fp32(((const uint16_t*)t->data)[i]);
}

#ifdef VICUNA_AVX2
static inline __m256 lora_load8(const uint8_t* p, bool f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)) : _mm256_loadu_ps((const float*)p);
}
#endif

// out[r - r0] = A[r] . x for r in [r0, r1); A is F32 or F16 with a.cols values a row
static void lora_a_rows(const Tensor* a, const float* x, int64_t r0, int64_t r1, float* out) {
    const int n = (int)a->cols;
    int64_t r = r0;
#ifdef VICUNA_AVX2
    const bool f16 = a->type == GGML_TYPE_F16;
    const size_t es = f16 ? 2 : 4;
    for (; r + 4 <= r1; r += 4) {
        __m256 acc[4][2];
        for (int k = 0; k < 4; k++) acc[k][0] = acc[k][1] = _mm256_setzero_ps();
        const uint8_t* row[4];
        for (int k = 0; k < 4; k++) row[k] = a->data + (size_t)(r + k) * a->row_bytes;
        int i = 0;
        for (; i + 16 <= n; i += 16) {
            __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            for (int k = 0; k < 4; k++) {
                acc[k][0] = _mm256_fmadd_ps(lora_load8(row[k] + i * es, f16), x0, acc[k][0]);
                acc[k][1] = _mm256_fmadd_ps(lora_load8(row[k] + (i + 8) * es, f16), x1, acc[k][1]);
            }
        }
        for (int k = 0; k < 4; k++) {
            float sum = hsum_f32x8(_mm256_add_ps(acc[k][0], acc[k][1]));
            for (int j = i; j < n; j++) sum += lora_load(a, (size_t)(r + k) * n + j) * x[j];
            out[r + k - r0] = sum;
        }
    }
#endif
    for (; r < r1; r++) {
        float sum = 0.0f;
        for (int j = 0; j < n; j++) sum += lora_load(a, (size_t)r * n + j) * x[j];
        out[r - r0] = sum;
    }
}

// out[j] += sum_k c[k] * B[r0 + j, k0 + k] for j in [0, n), k in [0, nk): rows r0.. of B applied to
// c = scale * (A x)[k0..k0+nk)
static void lora_b_add(const LoraWeight* L, int k0, int nk, const float* c, float* out, int64_t r0, int64_t n) {
    const Tensor* bp = &L->bp;
    const int64_t rank = L->rank;
    const int64_t r1 = r0 + n;
    auto scalar_row = [&](int64_t r) {
        float sum = out[r - r0];
        size_t base = (size_t)((r / 8) * rank * 8 + r % 8);
        for (int k = 0; k < nk; k++) sum += c[k] * lora_load(bp, base + (size_t)(k0 + k) * 8);
        out[r - r0] = sum;
    };
    int64_t r = r0;
    for (; r < r1 && r % 8 != 0; r++) scalar_row(r);  // up to the first whole panel
#ifdef VICUNA_AVX2
    const bool f16 = bp->type == GGML_TYPE_F16;
    const size_t es = f16 ? 2 : 4, panel = (size_t)rank * 8 * es;
    for (; r + 32 <= r1; r += 32) {  // four panels
        const uint8_t* p = bp->data + (size_t)(r / 8) * panel + (size_t)k0 * 8 * es;
        __m256 acc[4];
        for (int v = 0; v < 4; v++) acc[v] = _mm256_loadu_ps(out + (r - r0) + 8 * v);
        for (int k = 0; k < nk; k++) {
            __m256 ck = _mm256_set1_ps(c[k]);
            for (int v = 0; v < 4; v++) acc[v] = _mm256_fmadd_ps(ck, lora_load8(p + v * panel + (size_t)k * 8 * es, f16), acc[v]);
        }
        for (int v = 0; v < 4; v++) _mm256_storeu_ps(out + (r - r0) + 8 * v, acc[v]);
    }
    for (; r + 8 <= r1; r += 8) {
        const uint8_t* p = bp->data + (size_t)(r / 8) * panel + (size_t)k0 * 8 * es;
        __m256 acc = _mm256_loadu_ps(out + (r - r0));
        for (int k = 0; k < nk; k++) acc = _mm256_fmadd_ps(_mm256_set1_ps(c[k]), lora_load8(p + (size_t)k * 8 * es, f16), acc);
        _mm256_storeu_ps(out + (r - r0), acc);
    }
#endif
    for (; r < r1; r++) scalar_row(r);
}

static inline void lora_prefetch(const uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; i += 64) __builtin_prefetch(p + i);
}

// the panels holding B's rows [r0, r1)
static void lora_prefetch_panels(const LoraWeight* L, int64_t r0, int64_t r1) {
    size_t es = L->bp.type == GGML_TYPE_F16 ? 2 : 4, panel = (size_t)L->rank * 8 * es;
    lora_prefetch(L->bp.data + (size_t)(r0 / 8) * panel, (size_t)((r1 + 7) / 8 - r0 / 8) * panel);
}

// out[b, r0..r1) += scale * B[r0..r1) . t[b] for the B tokens of a weight with a LoRA pair
static void lora_add_rows(const LoraWeight* L, const float* t, float* out, int64_t rows, int64_t r0, int64_t r1,
                          int B) {
    float c[128];  // scale * t[b], up to 128 of the rank at a time
    for (int b = 0; b < B; b++) {
        const float* tb = t + (size_t)b * L->rank;
        for (int k0 = 0; k0 < L->rank; k0 += 128) {
            int nk = std::min(128, L->rank - k0);
            for (int k = 0; k < nk; k++) c[k] = L->scale * tb[k0 + k];
            lora_b_add(L, k0, nk, c, out + (size_t)b * rows + r0, r0, r1 - r0);
        }
    }
}

static void matmul_worker(void* p, int ith, int nth) {
    (void)ith;
    (void)nth;
    MatmulTask* t = (MatmulTask*)p;
    const int total = t->chunk_end[t->n_jobs - 1];
    for (;;) {
        int c = t->next.fetch_add(1, std::memory_order_relaxed);
        if (c >= total) break;
        int j = 0;
        while (c >= t->chunk_end[j]) j++;
        int local = c - (j > 0 ? t->chunk_end[j - 1] : 0);
        const Tensor* w = t->jobs[j].w;
        float* out = t->jobs[j].out;
        int64_t r0 = (int64_t)local * t->chunk_rows[j], r1 = std::min(w->rows, r0 + t->chunk_rows[j]);
        const bool lora_a = c < t->lora_chunks;  // a LoRA A product, F32/F16
        // LoRA data comes in small pieces the hardware prefetcher does not ramp up on: ask for the
        // A rows of this chunk now, and for the B panels of W's rows before W's dot products, which
        // then hide the wait.
        if (lora_a) lora_prefetch(w->data + (size_t)r0 * w->row_bytes, (size_t)(r1 - r0) * w->row_bytes);
        if (w->lora) lora_prefetch_panels(w->lora, r0, r1);
        // The chunk's rows (<= ~16 KB) stay in L1 while four tokens at a time stream past them;
        // each weight block is unpacked once per four tokens (prefill).
        float o[8];
        int b = 0;
        if (!lora_a && w->packed && t->B >= 4) {  // K-quants repacked: 8 rows x NP tokens a call
            const int nsb = t->cols / QK_K;
            const uint8_t* pk = w->packed->data();
            const BlockQ8K* xs[Q4_KX8_TOKENS];
            auto run = [&](auto np) {
                constexpr int NP = decltype(np)::value;
                for (; b + NP <= t->B; b += NP) {
                    for (int c = 0; c < NP; c++) xs[c] = t->xqk + (size_t)(b + c) * nsb;
                    for (int64_t r = r0; r < r1; r += 8)
                        dot_packed_x8<NP>(w->type, pk, r / 8, xs, nsb, out + (size_t)b * w->rows + r, (size_t)w->rows);
                }
            };
            run(std::integral_constant<int, Q4_KX8_TOKENS>());
            run(std::integral_constant<int, 1>());
        }
#ifdef __AVX512VL__
        // K-quant kernels keep eight tokens' integer sums in registers when there are 32 of them
        // (AVX-512VL): the weights and their scales are unpacked once per eight tokens
        if (w->type == GGML_TYPE_Q4_K || w->type == GGML_TYPE_Q5_K || w->type == GGML_TYPE_Q6_K) {
            for (; b + 8 <= t->B; b += 8) {
                for (int64_t r = r0; r < r1; r++) {
                    dot_row<8>(w->type, w->data + (size_t)r * w->row_bytes, t->x, t->xq, t->xqk, b, t->cols, o);
                    for (int k = 0; k < 8; k++) out[(size_t)(b + k) * w->rows + r] = o[k];
                }
            }
        }
#endif
        for (; b + 4 <= t->B; b += 4) {
            for (int64_t r = r0; r < r1; r++) {
                dot_row<4>(w->type, w->data + (size_t)r * w->row_bytes, t->x, t->xq, t->xqk, b, t->cols, o);
                for (int k = 0; k < 4; k++) out[(size_t)(b + k) * w->rows + r] = o[k];
            }
        }
        for (; b < t->B; b++) {
            if (lora_a) {
                lora_a_rows(w, t->x + (size_t)b * t->cols, r0, r1, out + (size_t)b * w->rows + r0);
                continue;
            }
            for (int64_t r = r0; r < r1; r++) {
                dot_row<1>(w->type, w->data + (size_t)r * w->row_bytes, t->x, t->xq, t->xqk, b, t->cols, o);
                out[(size_t)b * w->rows + r] = o[0];
            }
        }
        if (lora_a) {  // publish it for the weights' chunks
            t->lora_done.fetch_add(1, std::memory_order_release);
        } else if (w->lora) {
            int spins = 0;
            while (t->lora_done.load(std::memory_order_acquire) < t->lora_chunks) spin_wait(&spins);
            lora_add_rows(w->lora, t->jobs[j].lora_t, out, w->rows, r0, r1, t->B);
        }
    }
}

// Chunk size: decode, about 8 chunks per thread and job, enough to balance and few enough to be
// cheap; prefill, chunks of ~16 KB of weights, which stay in L1 (see matmul_worker).
static int matmul_chunk_rows(const Tensor* w, int B, int n_threads) {
    int rows = (int)w->rows;
    int cr = B >= 4 ? std::max(4, (int)(16384 / w->row_bytes)) : std::max(4, (rows + n_threads * 8 - 1) / (n_threads * 8));
    // whole panels of B (lora_b_add), whole groups of 8 repacked rows
    return w->lora || (w->packed && B >= 4) ? (cr + 7) / 8 * 8 : cr;
}

// Q4_K, Q5_K and Q6_K weights are repacked (BlockQ4_Kx8, Q5_Kx8, Q6_Kx8) for multiplies of 4 or more tokens, once, on the first
// such multiply; VICUNA_NO_REPACK=1 keeps the row kernels (for comparison)
static bool repack_enabled() {
    static const bool on = [] {
        const char* e = getenv("VICUNA_NO_REPACK");
        return !(e && *e && strcmp(e, "0") != 0);
    }();
    return on;
}

static void repack_x8(const Tensor* w) {
    const int nsb = (int)(w->cols / QK_K);
    const uint32_t t = w->type;
    const size_t group = (size_t)nsb * (t == GGML_TYPE_Q4_K   ? sizeof(BlockQ4_Kx8)
                                        : t == GGML_TYPE_Q5_K ? sizeof(BlockQ5_Kx8)
                                                              : sizeof(BlockQ6_Kx8));
    auto buf = std::make_shared<std::vector<uint8_t>>((size_t)(w->rows / 8) * group);
    for (int64_t g = 0; g < w->rows / 8; g++) {
        const uint8_t* src = w->data + (size_t)g * 8 * w->row_bytes;
        uint8_t* dst = buf->data() + g * group;
        if (t == GGML_TYPE_Q4_K) repack_q4_K_x8(src, w->row_bytes, nsb, (BlockQ4_Kx8*)dst);
        else if (t == GGML_TYPE_Q5_K) repack_q5_K_x8(src, w->row_bytes, nsb, (BlockQ5_Kx8*)dst);
        else repack_q6_K_x8(src, w->row_bytes, nsb, (BlockQ6_Kx8*)dst);
    }
    w->packed = std::move(buf);
}

static void matmul(ThreadPool* pool, RunState* s, const float* x, int B, std::initializer_list<MatJob> jobs) {
    MatmulTask t;
    t.x = x;
    t.B = B;
    t.cols = (int)jobs.begin()->w->cols;
    bool quantized = false, kquant = false;  // which activation blocks the weights need
    // LoRA A products first (into s->lora_t), then the weights
    size_t lora_floats = 0;
    for (const MatJob& j : jobs) {
        if (j.w->lora) lora_floats += (size_t)B * j.w->lora->rank;
    }
    if (s->lora_t.size() < lora_floats) s->lora_t.resize(lora_floats);
    float* lora_t = s->lora_t.data();
    MatJob weights[3];
    int n_weights = 0;
    for (const MatJob& j : jobs) {
        MatJob wj = j;
        if (j.w->lora) {
            t.jobs[t.n_jobs++] = {&j.w->lora->a, lora_t};
            wj.lora_t = lora_t;
            lora_t += (size_t)B * j.w->lora->rank;
        }
        weights[n_weights++] = wj;
    }
    int n_lora = t.n_jobs;
    for (int i = 0; i < n_weights; i++) t.jobs[t.n_jobs++] = weights[i];
    int chunks = 0;
    for (int i = 0; i < t.n_jobs; i++) {
        const Tensor* w = t.jobs[i].w;
        if (B >= 4 && i >= n_lora && (w->type == GGML_TYPE_Q4_K || w->type == GGML_TYPE_Q5_K || w->type == GGML_TYPE_Q6_K) &&
            !w->packed &&
            w->rows % 8 == 0 && w->cols % QK_K == 0 && repack_enabled())
            repack_x8(w);
        bool k = w->type == GGML_TYPE_Q4_K || w->type == GGML_TYPE_Q5_K || w->type == GGML_TYPE_Q6_K;
        kquant |= k;
        quantized |= !k && w->type != GGML_TYPE_F32 && w->type != GGML_TYPE_F16 && w->type != GGML_TYPE_Q2_K &&
                     w->type != GGML_TYPE_Q3_K;
        t.chunk_rows[i] = matmul_chunk_rows(w, B, pool->n_threads);
        chunks += (int)((w->rows + t.chunk_rows[i] - 1) / t.chunk_rows[i]);
        t.chunk_end[i] = chunks;
        if (i + 1 == n_lora) t.lora_chunks = chunks;
    }
    if (quantized) {
        int nb = t.cols / QK;
        for (int b = 0; b < B; b++) quantize_act(x + (size_t)b * t.cols, s->xq.data() + (size_t)b * nb, t.cols);
        t.xq = s->xq.data();
    } else {
        t.xq = nullptr;
    }
    if (kquant) {
        int nsb = t.cols / QK_K;
        for (int b = 0; b < B; b++) quantize_act_k(x + (size_t)b * t.cols, s->xqk.data() + (size_t)b * nsb, t.cols);
        t.xqk = s->xqk.data();
    } else {
        t.xqk = nullptr;
    }
    pool_run(pool, matmul_worker, &t);
}

// ----------------------------------------------------------------------------
// attention: softmax(q k^T / sqrt(head_dim)) v over positions 0..pos, causal; with a sliding
// window W (Mistral) over pos-W+1..pos only: the token itself and the W-1 before it, as
// transformers' sliding_window_overlay (kv_idx > q_idx - W) and llama.cpp's LLAMA_SWA_TYPE_STANDARD
// (masked when p1 - p0 >= W). The cache keeps every position; the window only moves the start.
//
// A work item is one token and one kv head with the query heads that share it (grouped-query
// attention): every key and value row is loaded once for the whole group. In decode there is
// one token, so an item is a single head, to give every thread something to do.

struct AttnTask {
    const Config* c;
    RunState* s;
    KVCache* kv;
    int layer, B, pos0;
    int heads_per_item;  // query heads per work item: the group size, or 1 in decode
    std::atomic<int> next{0};
};

// att[g][pos] = q[g] . k[pos] * scale for pos < n_pos and the NG query heads q[g] that share the
// (n_pos, hd) keys k. Four positions at a time: each key row is loaded once for all NG heads,
// and the four dot products are reduced together with horizontal adds.
template <int NG>
static void attn_scores(const float* const* q, const float* k, int hd, int n_pos, float scale, float* const* att) {
    int pos = 0;
#ifdef VICUNA_AVX2
    if (hd % 8 == 0) {
        for (; pos + 4 <= n_pos; pos += 4) {
            __m256 acc[NG][4];
            for (int g = 0; g < NG; g++)
                for (int j = 0; j < 4; j++) acc[g][j] = _mm256_setzero_ps();
            const float* kr = k + (size_t)pos * hd;
            for (int d = 0; d < hd; d += 8) {
                __m256 k0 = _mm256_loadu_ps(kr + d), k1 = _mm256_loadu_ps(kr + hd + d);
                __m256 k2 = _mm256_loadu_ps(kr + 2 * hd + d), k3 = _mm256_loadu_ps(kr + 3 * hd + d);
                for (int g = 0; g < NG; g++) {
                    __m256 qv = _mm256_loadu_ps(q[g] + d);
                    acc[g][0] = _mm256_fmadd_ps(qv, k0, acc[g][0]);
                    acc[g][1] = _mm256_fmadd_ps(qv, k1, acc[g][1]);
                    acc[g][2] = _mm256_fmadd_ps(qv, k2, acc[g][2]);
                    acc[g][3] = _mm256_fmadd_ps(qv, k3, acc[g][3]);
                }
            }
            for (int g = 0; g < NG; g++) {
                __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[g][0], acc[g][1]), _mm256_hadd_ps(acc[g][2], acc[g][3]));
                __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
                _mm_storeu_ps(att[g] + pos, _mm_mul_ps(r, _mm_set1_ps(scale)));
            }
        }
    }
#endif
    for (; pos < n_pos; pos++) {
        const float* kr = k + (size_t)pos * hd;
        for (int g = 0; g < NG; g++) {
            float d;
            dot_f32<1>(q[g], &kr, hd, &d);
            att[g][pos] = d * scale;
        }
    }
}

static void attention_worker(void* p, int ith, int nth) {
    (void)nth;
    AttnTask* t = (AttnTask*)p;
    const Config* c = t->c;
    const int q_dim = c->n_heads * c->head_dim, hd = c->head_dim, group = c->n_heads / c->n_kv_heads;
    const int per_item = t->heads_per_item, items_per_token = c->n_heads / per_item;
    const float scale = 1.0f / std::sqrt((float)hd);
    float* att_base = t->s->att.data() + (size_t)ith * c->n_heads * t->kv->n_ctx;
    for (;;) {
        int item = t->next.fetch_add(1, std::memory_order_relaxed);
        if (item >= t->B * items_per_token) break;
        int b = item / items_per_token, h0 = (item % items_per_token) * per_item, kvh = h0 / group;
        int end = t->pos0 + b + 1;  // this token sees itself and everything before it
        int start = c->sliding_window > 0 ? std::max(0, end - c->sliding_window) : 0;  // ... in its window
        int n_pos = end - start;
        const float* keys = kv_keys(t->kv, t->layer, kvh) + (size_t)start * hd;
        const float* vals = kv_values(t->kv, t->layer, kvh) + (size_t)start * hd;
        for (int g0 = 0; g0 < per_item;) {  // query heads in register-sized groups of up to 2
            int ng = std::min(2, per_item - g0);
            const float* q[2];
            float* att[2];
            for (int g = 0; g < ng; g++) {
                q[g] = t->s->q.data() + (size_t)b * q_dim + (size_t)(h0 + g0 + g) * hd;
                att[g] = att_base + (size_t)(g0 + g) * t->kv->n_ctx;
            }
            if (ng == 2) attn_scores<2>(q, keys, hd, n_pos, scale, att);
            else attn_scores<1>(q, keys, hd, n_pos, scale, att);
            g0 += ng;
        }
        for (int g = 0; g < per_item; g++) {
            float* att = att_base + (size_t)g * t->kv->n_ctx;
            vec_softmax(att, n_pos);
            vec_weighted_sum(t->s->xb2.data() + (size_t)b * q_dim + (size_t)(h0 + g) * hd, att, vals, n_pos, hd);
        }
    }
}

// ----------------------------------------------------------------------------
// forward pass

static void rmsnorm(float* out, const float* x, const float* w, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float scale = 1.0f / std::sqrt((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * scale);
}

// RoPE on one token's heads: each pair of values is rotated by pos * inv_freq[i].
//   llama (neox false): adjacent pairs (x[2i], x[2i+1]). HF's LLaMA rotates the two halves of each
//     head instead (rotate_half); the GGUF converters permute the rows of wq and wk (llama.cpp's
//     LlamaModel.permute) so that this interleaved form gives the same result, which is why test
//     files written in tests/test_vicuna_cpp.py permute q/k exactly as convert_hf_to_gguf.
//   qwen2 (neox true): the halves, (x[i], x[i + rope_dim/2]), as HF computes it: llama.cpp's
//     converter stores Qwen2's q/k rows as they are, and its LLAMA_ROPE_TYPE_NEOX does the same.
static void rope(float* x, int n_heads, int head_dim, int rope_dim, bool neox, const float* cos_t,
                 const float* sin_t) {
    const int half = rope_dim / 2;
    const int stride = neox ? 1 : 2, off = neox ? half : 1;  // element 2i or i, and its partner
    for (int h = 0; h < n_heads; h++) {
        float* v = x + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            float* p0 = v + stride * i;
            float* p1 = p0 + off;
            float a = *p0, b = *p1;
            *p0 = a * cos_t[i] - b * sin_t[i];
            *p1 = a * sin_t[i] + b * cos_t[i];
        }
    }
}

static void add_bias(float* x, const std::vector<float>& bias) {  // x (n,) += bias (n,), or nothing
    for (size_t i = 0; i < bias.size(); i++) x[i] += bias[i];
}

// Runs B <= max_batch tokens at positions pos0.. through the model, appending their keys and
// values to the cache. logits: (B, vocab) when all_logits, else (1, vocab) for the last token.
static void forward_batch(const Model* m, RunState* s, KVCache* kv, ThreadPool* pool, const int* tokens, int B,
                          int pos0, float* logits, bool all_logits) {
    const Config* c = &m->cfg;
    const int dim = c->dim, q_dim = c->n_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    const int hid = c->hidden_dim, hd = c->head_dim, half = c->rope_dim / 2;

    for (int b = 0; b < B; b++) {
        if (tokens[b] < 0 || tokens[b] >= c->vocab_size) {
            FAIL("token id %d is outside the vocabulary [0, %d)", tokens[b], c->vocab_size);
        }
        const uint8_t* row = m->token_embd.data + (size_t)tokens[b] * m->token_embd.row_bytes;
        dequantize_row(m->token_embd.type, row, s->x.data() + (size_t)b * dim, dim);
        if (const LoraWeight* L = m->token_embd.lora) {  // x += scale * B a[token]
            if (s->lora_t.size() < (size_t)L->rank) s->lora_t.resize(L->rank);
            dequantize_row(L->a.type, L->a.data + (size_t)tokens[b] * L->a.row_bytes, s->lora_t.data(), L->rank);
            lora_add_rows(L, s->lora_t.data(), s->x.data() + (size_t)b * dim, dim, 0, dim, 1);
        }
        for (int i = 0; i < half; i++) {
            float angle = (float)(pos0 + b) * m->rope_inv_freq[i];
            s->rope_cos[(size_t)b * half + i] = std::cos(angle);
            s->rope_sin[(size_t)b * half + i] = std::sin(angle);
        }
    }

    for (int l = 0; l < c->n_layers; l++) {
        const LayerWeights* w = &m->layers[l];

        // attention
        for (int b = 0; b < B; b++) {
            rmsnorm(&s->xb[(size_t)b * dim], &s->x[(size_t)b * dim], w->attn_norm.data(), dim, c->norm_eps);
        }
        matmul(pool, s, s->xb.data(), B, {{&w->wq, s->q.data()}, {&w->wk, s->k.data()}, {&w->wv, s->v.data()}});
        for (int b = 0; b < B; b++) {
            const float* ct = &s->rope_cos[(size_t)b * half];
            const float* st = &s->rope_sin[(size_t)b * half];
            add_bias(&s->q[(size_t)b * q_dim], w->bq);
            add_bias(&s->k[(size_t)b * kv_dim], w->bk);
            add_bias(&s->v[(size_t)b * kv_dim], w->bv);
            rope(&s->q[(size_t)b * q_dim], c->n_heads, hd, c->rope_dim, c->rope_neox, ct, st);
            rope(&s->k[(size_t)b * kv_dim], c->n_kv_heads, hd, c->rope_dim, c->rope_neox, ct, st);
            for (int h = 0; h < c->n_kv_heads; h++) {
                memcpy(kv_keys(kv, l, h) + (size_t)(pos0 + b) * hd, &s->k[(size_t)b * kv_dim + h * hd],
                       sizeof(float) * hd);
                memcpy(kv_values(kv, l, h) + (size_t)(pos0 + b) * hd, &s->v[(size_t)b * kv_dim + h * hd],
                       sizeof(float) * hd);
            }
        }
        AttnTask at;
        at.c = c;
        at.s = s;
        at.kv = kv;
        at.layer = l;
        at.B = B;
        at.pos0 = pos0;
        at.heads_per_item = B >= 4 ? c->n_heads / c->n_kv_heads : 1;
        pool_run(pool, attention_worker, &at);
        matmul(pool, s, s->xb2.data(), B, {{&w->wo, s->xb.data()}});
        for (size_t i = 0; i < (size_t)B * dim; i++) s->x[i] += s->xb[i];

        // SwiGLU feed-forward
        for (int b = 0; b < B; b++) {
            rmsnorm(&s->xb[(size_t)b * dim], &s->x[(size_t)b * dim], w->ffn_norm.data(), dim, c->norm_eps);
        }
        matmul(pool, s, s->xb.data(), B, {{&w->w_gate, s->hb.data()}, {&w->w_up, s->hb2.data()}});
        vec_swiglu(s->hb.data(), s->hb2.data(), B * hid);
        matmul(pool, s, s->hb.data(), B, {{&w->w_down, s->xb.data()}});
        for (size_t i = 0; i < (size_t)B * dim; i++) s->x[i] += s->xb[i];
    }

    // final norm and classifier, for every token or only the last
    int first = all_logits ? 0 : B - 1, n_out = B - first;
    for (int b = first; b < B; b++) {
        rmsnorm(&s->xb[(size_t)(b - first) * dim], &s->x[(size_t)b * dim], m->output_norm.data(), dim, c->norm_eps);
    }
    matmul(pool, s, s->xb.data(), n_out, {{&m->output, logits}});
}
