// vicuna.cpp: LLaMA-architecture inference on the CPU, straight from a GGUF file.
//
// The engine is this file plus four headers, each one concern, read in this order:
//   common.h      errors (one-line messages, thrown), fp16 conversion
//   gguf.h        GGUF v3 reader (mmap, validated) and writer
//   quants.h      Q8_0/Q4_0/Q4_1 blocks, reference quantizers, AVX2/scalar dot products
//   threadpool.h  std::thread workers
//   tokenizer.h   byte-level BPE and SentencePiece from GGUF metadata
// and below: the model (Config, Weights, KVCache, RunState, forward), the sampler, the prompt
// templates (byte-identical to prompt.py), quantize, and the CLI. test.cpp includes this file
// with -DTESTING, which leaves out main().
//
// Build: make cpp (top level), or cmake -S tools/vicuna.cpp -B tools/vicuna.cpp/build.
// No third-party code: everything here, down to the Unicode tables, is generated or written for
// this project.

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <iostream>
#include <numeric>
#include <string>
#include <vector>

#include "common.h"
#include "gguf.h"
#include "quants.h"
#include "threadpool.h"
#include "tokenizer.h"

// ----------------------------------------------------------------------------
// model: hyperparameters and weights

struct Config {
    int dim;          // residual stream width (llama.embedding_length)
    int hidden_dim;   // SwiGLU width (llama.feed_forward_length)
    int n_layers;     // llama.block_count
    int n_heads;      // query heads (llama.attention.head_count)
    int n_kv_heads;   // key/value heads, < n_heads for grouped-query attention
    int head_dim;     // dim / n_heads unless llama.attention.key_length says otherwise
    int rope_dim;     // leading dims of each head that RoPE rotates (llama.rope.dimension_count)
    int vocab_size;   // rows of token_embd
    int ctx_train;    // llama.context_length
    float rope_theta; // llama.rope.freq_base
    float norm_eps;   // llama.attention.layer_norm_rms_epsilon
};

// A weight matrix of shape (rows, cols), row-major; GGUF calls cols ne[0] and rows ne[1].
struct Tensor {
    std::string_view name;
    uint32_t type = GGML_TYPE_F32;
    int64_t rows = 0, cols = 0;
    size_t row_bytes = 0;
    const uint8_t* data = nullptr;  // points into the mmap'ed file
};

struct LayerWeights {
    std::vector<float> attn_norm;  // (dim,)
    Tensor wq;                     // (n_heads*head_dim, dim)    rows permuted for interleaved RoPE, see rope()
    Tensor wk;                     // (n_kv_heads*head_dim, dim) likewise
    Tensor wv;                     // (n_kv_heads*head_dim, dim)
    Tensor wo;                     // (dim, n_heads*head_dim)
    std::vector<float> ffn_norm;   // (dim,)
    Tensor w_gate;                 // (hidden_dim, dim)
    Tensor w_up;                   // (hidden_dim, dim)
    Tensor w_down;                 // (dim, hidden_dim)
};

struct Model {
    GGUFFile file;                   // owns the mapping every Tensor points into
    Config cfg;
    Tensor token_embd;               // (vocab, dim)
    std::vector<LayerWeights> layers;
    std::vector<float> output_norm;  // (dim,)
    Tensor output;                   // (vocab, dim); token_embd when the embeddings are tied
    std::vector<float> rope_inv_freq;  // (rope_dim/2,) theta^(-2i/rope_dim)
};

static Tensor model_matrix(const GGUFFile* f, const std::string& name, int64_t rows, int64_t cols) {
    const GGUFTensor* t = gguf_find_tensor(f, name);
    if (!t) {
        FAIL("'%s' lacks the tensor '%s'; is it a LLaMA model exported by tools/convert_gguf.py?",
             printable(f->path).c_str(), name.c_str());
    }
    if (t->n_dims != 2 || (int64_t)t->ne[0] != cols || (int64_t)t->ne[1] != rows) {
        FAIL("'%s': tensor '%s' has shape [%" PRIu64 ", %" PRIu64 ", %" PRIu64 "] (%u dims), expected [%" PRId64
             ", %" PRId64 "] from the llama.* metadata", printable(f->path).c_str(), name.c_str(), t->ne[0],
             t->ne[1], t->ne[2], t->n_dims, cols, rows);
    }
    size_t align = t->type == GGML_TYPE_F32 ? 4 : 2;
    if ((uintptr_t)t->data % align != 0) {
        FAIL("'%s': tensor '%s' data is not %zu-byte aligned (general.alignment = %" PRIu64 ")",
             printable(f->path).c_str(), name.c_str(), align, f->alignment);
    }
    Tensor m;
    m.name = t->name;
    m.type = t->type;
    m.rows = rows;
    m.cols = cols;
    m.row_bytes = (size_t)(t->n_bytes / (uint64_t)rows);
    m.data = t->data;
    return m;
}

static std::vector<float> model_vector(const GGUFFile* f, const std::string& name, int64_t n) {
    const GGUFTensor* t = gguf_find_tensor(f, name);
    if (!t) FAIL("'%s' lacks the tensor '%s'", printable(f->path).c_str(), name.c_str());
    if (t->n_elements != (uint64_t)n || t->ne[0] != (uint64_t)n) {
        FAIL("'%s': tensor '%s' has %" PRIu64 " elements, expected a vector of %" PRId64,
             printable(f->path).c_str(), name.c_str(), t->n_elements, n);
    }
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16) {
        FAIL("'%s': norm tensor '%s' has type %s; expected F32 or F16", printable(f->path).c_str(), name.c_str(),
             ggml_type_info(t->type).name);
    }
    std::vector<float> v((size_t)n);
    if (t->type == GGML_TYPE_F32) {
        memcpy(v.data(), t->data, (size_t)n * 4);
    } else {
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, t->data + 2 * i, 2);
            v[i] = fp16_to_fp32(h);
        }
    }
    return v;
}

static int model_int(const GGUFFile* f, const std::string& key, int64_t def, bool required, int64_t lo, int64_t hi) {
    return (int)gguf_get_int(f, key.c_str(), def, required, lo, hi);
}

// Reads the llama.* hyperparameters, checks them against the tensor shapes, and points the
// weights into the already parsed file. Takes ownership of *file.
static void model_init(Model* m, GGUFFile* file) {
    m->file = std::move(*file);
    *file = GGUFFile();
    const GGUFFile* f = &m->file;
    std::string path = printable(f->path);
    std::string_view arch = gguf_get_str(f, "general.architecture", true);
    if (arch != "llama") {
        FAIL("'%s' is a '%s' model; vicuna runs the llama architecture (LLaMA, SmolLM2, Mistral-style)",
             path.c_str(), printable(arch).c_str());
    }
    const std::string a = "llama.";
    Config& c = m->cfg;
    c.dim = model_int(f, a + "embedding_length", 0, true, 1, 1 << 16);
    c.n_layers = model_int(f, a + "block_count", 0, true, 1, 1024);
    c.n_heads = model_int(f, a + "attention.head_count", 0, true, 1, 1024);
    c.n_kv_heads = model_int(f, a + "attention.head_count_kv", c.n_heads, false, 1, c.n_heads);
    if (c.n_heads % c.n_kv_heads != 0) {
        FAIL("'%s': %d attention heads cannot share %d key/value heads evenly", path.c_str(), c.n_heads,
             c.n_kv_heads);
    }
    int64_t head_dim_def = c.dim % c.n_heads == 0 ? c.dim / c.n_heads : 0;
    c.head_dim = model_int(f, a + "attention.key_length", head_dim_def, head_dim_def == 0, 2, 1024);
    if (model_int(f, a + "attention.value_length", c.head_dim, false, 1, 1024) != c.head_dim) {
        FAIL("'%s': key and value head sizes differ, which vicuna does not support", path.c_str());
    }
    if (c.head_dim % 2 != 0) FAIL("'%s': head size %d is odd; RoPE needs pairs", path.c_str(), c.head_dim);
    c.rope_dim = model_int(f, a + "rope.dimension_count", c.head_dim, false, 2, c.head_dim);
    c.rope_dim &= ~1;
    c.ctx_train = model_int(f, a + "context_length", 2048, false, 1, 1 << 24);
    c.rope_theta = (float)gguf_get_float(f, (a + "rope.freq_base").c_str(), 10000.0);
    c.norm_eps = (float)gguf_get_float(f, (a + "attention.layer_norm_rms_epsilon").c_str(), 1e-5);
    if (!(c.rope_theta > 0.0f) || !std::isfinite(c.rope_theta)) {
        FAIL("'%s': llama.rope.freq_base = %g is not a positive number", path.c_str(), c.rope_theta);
    }
    if (!(c.norm_eps > 0.0f) || !(c.norm_eps < 1.0f)) {
        FAIL("'%s': llama.attention.layer_norm_rms_epsilon = %g is not in (0, 1)", path.c_str(), c.norm_eps);
    }

    const GGUFTensor* embd = gguf_find_tensor(f, "token_embd.weight");
    if (!embd) FAIL("'%s' lacks the tensor 'token_embd.weight'", path.c_str());
    if (embd->ne[1] > (1u << 24)) FAIL("'%s': vocabulary of %" PRIu64 " rows is too large", path.c_str(), embd->ne[1]);
    c.vocab_size = (int)embd->ne[1];
    const GGUFTensor* gate = gguf_find_tensor(f, "blk.0.ffn_gate.weight");
    if (!gate) FAIL("'%s' lacks the tensor 'blk.0.ffn_gate.weight'", path.c_str());
    if (gate->ne[1] > (1u << 20)) FAIL("'%s': feed-forward width %" PRIu64 " is too large", path.c_str(), gate->ne[1]);
    c.hidden_dim = model_int(f, a + "feed_forward_length", (int64_t)gate->ne[1], false, 1, 1 << 20);

    int q_dim = c.n_heads * c.head_dim, kv_dim = c.n_kv_heads * c.head_dim;
    m->token_embd = model_matrix(f, "token_embd.weight", c.vocab_size, c.dim);
    m->layers.resize(c.n_layers);
    for (int l = 0; l < c.n_layers; l++) {
        LayerWeights& w = m->layers[l];
        std::string p = "blk." + std::to_string(l) + ".";
        w.attn_norm = model_vector(f, p + "attn_norm.weight", c.dim);
        w.wq = model_matrix(f, p + "attn_q.weight", q_dim, c.dim);
        w.wk = model_matrix(f, p + "attn_k.weight", kv_dim, c.dim);
        w.wv = model_matrix(f, p + "attn_v.weight", kv_dim, c.dim);
        w.wo = model_matrix(f, p + "attn_output.weight", c.dim, q_dim);
        w.ffn_norm = model_vector(f, p + "ffn_norm.weight", c.dim);
        w.w_gate = model_matrix(f, p + "ffn_gate.weight", c.hidden_dim, c.dim);
        w.w_up = model_matrix(f, p + "ffn_up.weight", c.hidden_dim, c.dim);
        w.w_down = model_matrix(f, p + "ffn_down.weight", c.dim, c.hidden_dim);
    }
    m->output_norm = model_vector(f, "output_norm.weight", c.dim);
    m->output = gguf_find_tensor(f, "output.weight") ? model_matrix(f, "output.weight", c.vocab_size, c.dim)
                                                      : m->token_embd;  // tied embeddings

    // HF computes 1 / theta^(2i/d) in float32; so do we, to agree on the angles
    m->rope_inv_freq.resize(c.rope_dim / 2);
    for (int i = 0; i < c.rope_dim / 2; i++) {
        m->rope_inv_freq[i] = 1.0f / std::pow(c.rope_theta, (float)(2 * i) / (float)c.rope_dim);
    }
}

static void model_free(Model* m) {
    gguf_free(&m->file);
    m->layers.clear();
}

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
    std::vector<float> logits;    // (B, vocab)
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
    s->logits.assign(B * c->vocab_size, 0.0f);
}

static void state_free(RunState* s) { *s = RunState(); }

// ----------------------------------------------------------------------------
// matmul: out (B, rows) = x (B, cols) @ W^T, for up to three weights sharing one input
//
// The rows of all jobs are cut into chunks that the threads take from an atomic counter, so
// one dispatch covers q, k and v (or gate and up) and a slow thread does not hold up the rest.

struct MatJob {
    const Tensor* w;
    float* out;  // (B, w->rows)
};

struct MatmulTask {
    MatJob jobs[3];
    int n_jobs = 0;
    int chunk_rows[3];
    int chunk_end[3];     // cumulative chunk counts
    const float* x;       // (B, cols)
    const BlockQ8A* xq;   // (B, cols/32), when a weight is quantized
    int B, cols;
    std::atomic<int> next{0};
};

template <int NC>
static inline void dot_row(uint32_t type, const uint8_t* row, const float* x, const BlockQ8A* xq, int b, int cols,
                           float* out) {
    if (type == GGML_TYPE_F32 || type == GGML_TYPE_F16) {
        const float* xs[NC];
        for (int c = 0; c < NC; c++) xs[c] = x + (size_t)(b + c) * cols;
        if (type == GGML_TYPE_F32) dot_f32<NC>((const float*)row, xs, cols, out);
        else dot_f16<NC>((const uint16_t*)row, xs, cols, out);
        return;
    }
    int nb = cols / QK;
    const BlockQ8A* xs[NC];
    for (int c = 0; c < NC; c++) xs[c] = xq + (size_t)(b + c) * nb;
    switch (type) {
        case GGML_TYPE_Q8_0: dot_blocks<Q8_0Kind, NC>((const BlockQ8_0*)row, xs, nb, out); break;
        case GGML_TYPE_Q4_0: dot_blocks<Q4_0Kind, NC>((const BlockQ4_0*)row, xs, nb, out); break;
        case GGML_TYPE_Q4_1: dot_blocks<Q4_1Kind, NC>((const BlockQ4_1*)row, xs, nb, out); break;
    }
}

// the same with the portable kernels (the unit test's reference)
template <int NC>
[[maybe_unused]] static void dot_row_ref(uint32_t type, const uint8_t* row, const float* x, const BlockQ8A* xq, int b,
                                         int cols, float* out) {
    const float* xs[NC];
    const BlockQ8A* xqs[NC];
    for (int c = 0; c < NC; c++) {
        xs[c] = x + (size_t)(b + c) * cols;
        xqs[c] = xq + (size_t)(b + c) * (cols / QK);
    }
    switch (type) {
        case GGML_TYPE_F32: dot_f32_ref<NC>((const float*)row, xs, cols, out); break;
        case GGML_TYPE_F16: dot_f16_ref<NC>((const uint16_t*)row, xs, cols, out); break;
        case GGML_TYPE_Q8_0: dot_blocks_ref<Q8_0Kind, NC>((const BlockQ8_0*)row, xqs, cols / QK, out); break;
        case GGML_TYPE_Q4_0: dot_blocks_ref<Q4_0Kind, NC>((const BlockQ4_0*)row, xqs, cols / QK, out); break;
        case GGML_TYPE_Q4_1: dot_blocks_ref<Q4_1Kind, NC>((const BlockQ4_1*)row, xqs, cols / QK, out); break;
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
        // The chunk's rows (<= ~16 KB) stay in L1 while four tokens at a time stream past them;
        // each weight block is unpacked once per four tokens (prefill).
        float o[4];
        int b = 0;
        for (; b + 4 <= t->B; b += 4) {
            for (int64_t r = r0; r < r1; r++) {
                dot_row<4>(w->type, w->data + (size_t)r * w->row_bytes, t->x, t->xq, b, t->cols, o);
                for (int k = 0; k < 4; k++) out[(size_t)(b + k) * w->rows + r] = o[k];
            }
        }
        for (; b < t->B; b++) {
            for (int64_t r = r0; r < r1; r++) {
                dot_row<1>(w->type, w->data + (size_t)r * w->row_bytes, t->x, t->xq, b, t->cols, o);
                out[(size_t)b * w->rows + r] = o[0];
            }
        }
    }
}

static void matmul(ThreadPool* pool, RunState* s, const float* x, int B, std::initializer_list<MatJob> jobs) {
    MatmulTask t;
    t.x = x;
    t.B = B;
    t.cols = (int)jobs.begin()->w->cols;
    bool quantized = false;
    int chunks = 0;
    for (const MatJob& j : jobs) {
        quantized |= j.w->type != GGML_TYPE_F32 && j.w->type != GGML_TYPE_F16;
        // decode: about 8 chunks per thread and job, enough to balance and few enough to be
        // cheap; prefill: chunks of ~16 KB of weights, which stay in L1 (see matmul_worker)
        int rows = (int)j.w->rows;
        int cr = B >= 4 ? std::max(4, (int)(16384 / j.w->row_bytes))
                        : std::max(4, (rows + pool->n_threads * 8 - 1) / (pool->n_threads * 8));
        t.jobs[t.n_jobs] = j;
        t.chunk_rows[t.n_jobs] = cr;
        chunks += (rows + cr - 1) / cr;
        t.chunk_end[t.n_jobs] = chunks;
        t.n_jobs++;
    }
    if (quantized) {
        int nb = t.cols / QK;
        for (int b = 0; b < B; b++) quantize_act(x + (size_t)b * t.cols, s->xq.data() + (size_t)b * nb, t.cols);
        t.xq = s->xq.data();
    } else {
        t.xq = nullptr;
    }
    pool_run(pool, matmul_worker, &t);
}

// ----------------------------------------------------------------------------
// attention: softmax(q k^T / sqrt(head_dim)) v over positions 0..pos, causal
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
        int n_pos = t->pos0 + b + 1;  // this token sees itself and everything before it
        const float* keys = kv_keys(t->kv, t->layer, kvh);
        const float* vals = kv_values(t->kv, t->layer, kvh);
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

// RoPE on one token's heads, rotating adjacent pairs (x[2i], x[2i+1]) by pos * theta^(-2i/d).
// HF's LLaMA rotates the two halves of each head instead (rotate_half); the GGUF converters
// permute the rows of wq and wk so that this interleaved form gives the same result, which is
// why test files written in tests/test_vicuna_cpp.py permute q/k exactly as convert_hf_to_gguf.
static void rope(float* x, int n_heads, int head_dim, int rope_dim, const float* cos_t, const float* sin_t) {
    for (int h = 0; h < n_heads; h++) {
        float* v = x + (size_t)h * head_dim;
        for (int i = 0; i < rope_dim / 2; i++) {
            float a = v[2 * i], b = v[2 * i + 1];
            v[2 * i] = a * cos_t[i] - b * sin_t[i];
            v[2 * i + 1] = a * sin_t[i] + b * cos_t[i];
        }
    }
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
            rope(&s->q[(size_t)b * q_dim], c->n_heads, hd, c->rope_dim, ct, st);
            rope(&s->k[(size_t)b * kv_dim], c->n_kv_heads, hd, c->rope_dim, ct, st);
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

// ----------------------------------------------------------------------------
// engine: a model with its tokenizer, threads, cache and the tokens the cache holds

struct Engine {
    Model model;
    Tokenizer tok;
    ThreadPool pool;
    RunState state;
    KVCache kv;
    std::vector<int> cached;    // tokens whose keys/values fill kv[0, cached.size())
    std::vector<float> logits;  // (vocab,) next-token logits after the last engine_eval
    ~Engine();                  // engine_free: joins the threads also when an error unwinds
};

static const int MAX_BATCH = 64;  // tokens per forward_batch in prefill

static int default_threads() {
    unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 4 : (int)std::min(n, 16u);
}

// Builds an engine from a parsed file (taking ownership of it); n_ctx <= 0 means
// min(2048, the training context).
static void engine_init_gguf(Engine* e, GGUFFile* f, int n_ctx, int n_threads) {
    model_init(&e->model, f);
    tokenizer_init(&e->tok, &e->model.file);
    const Config* c = &e->model.cfg;
    if (e->tok.n_tokens > c->vocab_size) {
        FAIL("'%s': the tokenizer has %d tokens but token_embd.weight only %d rows",
             printable(e->model.file.path).c_str(), e->tok.n_tokens, c->vocab_size);
    }
    if (n_ctx <= 0) n_ctx = std::min(2048, c->ctx_train);
    if (n_ctx > c->ctx_train) {
        FAIL("context of %d tokens (-c) exceeds the %d the model was trained with", n_ctx, c->ctx_train);
    }
    if (n_threads <= 0) n_threads = default_threads();
    pool_init(&e->pool, n_threads);
    kv_cache_init(&e->kv, c, n_ctx);
    state_init(&e->state, c, MAX_BATCH, n_ctx, n_threads);
    e->logits.assign(c->vocab_size, 0.0f);
}

static void engine_init(Engine* e, const char* path, int n_ctx, int n_threads) {
    GGUFFile f;
    gguf_init_from_file(&f, path);
    engine_init_gguf(e, &f, n_ctx, n_threads);
}

static void engine_free(Engine* e) {  // safe to call twice
    pool_free(&e->pool);
    state_free(&e->state);
    kv_cache_free(&e->kv);
    model_free(&e->model);
    e->cached.clear();
}

Engine::~Engine() { engine_free(this); }

// Runs tokens[0, n) at positions pos.. in batches of MAX_BATCH. logits: (n, vocab) for every
// position when all_logits, else the last position's (vocab,).
static void engine_forward(Engine* e, const int* tokens, int n, int pos, float* logits, bool all_logits) {
    if (pos + n > e->kv.n_ctx) {
        FAIL("%d tokens at position %d do not fit the context of %d tokens; raise -c", n, pos, e->kv.n_ctx);
    }
    int V = e->model.cfg.vocab_size;
    for (int i = 0; i < n; i += MAX_BATCH) {
        int B = std::min(MAX_BATCH, n - i);
        bool last = i + B == n;
        if (!all_logits && !last) {
            forward_batch(&e->model, &e->state, &e->kv, &e->pool, tokens + i, B, pos + i, e->state.logits.data(), false);
            continue;
        }
        float* out = all_logits ? logits + (size_t)i * V : logits;
        forward_batch(&e->model, &e->state, &e->kv, &e->pool, tokens + i, B, pos + i, out, all_logits);
    }
}

// Makes the cache hold exactly ids and returns the logits after its last token. The longest
// prefix shared with what the cache already holds is not recomputed (multi-turn chat, and
// generation one token at a time).
static const float* engine_eval(Engine* e, const std::vector<int>& ids) {
    if (ids.empty()) FAIL("nothing to evaluate: the prompt has no tokens");
    if ((int)ids.size() > e->kv.n_ctx) {
        FAIL("%zu tokens do not fit the context of %d; raise -c or shorten the prompt", ids.size(), e->kv.n_ctx);
    }
    size_t p = 0;
    while (p < e->cached.size() && p < ids.size() && e->cached[p] == ids[p]) p++;
    if (p == ids.size()) p--;  // recompute the last token to get its logits
    e->cached.resize(p);
    engine_forward(e, ids.data() + p, (int)(ids.size() - p), (int)p, e->logits.data(), false);
    e->cached = ids;
    return e->logits.data();
}

static std::string_view token_text(const Tokenizer* t, int id) {
    return id >= 0 && id < t->n_tokens ? std::string_view(t->decoded[id]) : std::string_view();
}

// ----------------------------------------------------------------------------
// sampler: repetition penalty, temperature, top-k, top-p, in the order HF's generate applies them

struct Sampler {
    float temp = 0.7f;            // 0: greedy
    int top_k = 40;               // 0: off
    float top_p = 0.9f;           // 1: off
    float repeat_penalty = 1.1f;  // HF's repetition_penalty over the whole context; 1: off
    uint64_t rng = 0x853c49e6748fea9bULL;
    std::vector<float> logits;                // (vocab,) scratch
    std::vector<std::pair<float, int>> cand;  // (vocab,) scratch
    std::vector<uint8_t> seen;                // (vocab,) scratch
};

static void sampler_seed(Sampler* s, uint64_t seed) { s->rng = seed * 0x9e3779b97f4a7c15ULL + 0x853c49e6748fea9bULL; }

static uint32_t rng_u32(uint64_t* state) {  // xorshift64*
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545f4914f6cdd1dULL) >> 32);
}
static float rng_f32(uint64_t* state) { return (rng_u32(state) >> 8) / 16777216.0f; }

static int sampler_sample(Sampler* s, const float* logits_in, int n, const std::vector<int>& context) {
    s->logits.assign(logits_in, logits_in + n);
    float* logits = s->logits.data();
    if (s->repeat_penalty != 1.0f) {
        s->seen.assign(n, 0);
        for (int id : context) {
            if (id < 0 || id >= n || s->seen[id]) continue;
            s->seen[id] = 1;
            logits[id] = logits[id] > 0 ? logits[id] / s->repeat_penalty : logits[id] * s->repeat_penalty;
        }
    }
    if (s->temp <= 0.0f) return (int)(std::max_element(logits, logits + n) - logits);

    s->cand.resize(n);
    for (int i = 0; i < n; i++) s->cand[i] = {logits[i] / s->temp, i};
    auto by_logit = [](const std::pair<float, int>& a, const std::pair<float, int>& b) { return a.first > b.first; };
    size_t k = (s->top_k > 0 && s->top_k < n) ? (size_t)s->top_k : (size_t)n;
    std::partial_sort(s->cand.begin(), s->cand.begin() + k, s->cand.end(), by_logit);
    s->cand.resize(k);
    float max = s->cand[0].first, sum = 0.0f;
    for (auto& c : s->cand) sum += (c.first = std::exp(c.first - max));
    for (auto& c : s->cand) c.first /= sum;
    if (s->top_p < 1.0f) {  // the smallest prefix whose probability reaches top_p
        float cum = 0.0f;
        size_t keep = 0;
        while (keep < s->cand.size()) {
            cum += s->cand[keep++].first;
            if (cum >= s->top_p) break;
        }
        s->cand.resize(keep);
        sum = cum;
    } else {
        sum = 1.0f;
    }
    float r = rng_f32(&s->rng) * sum, acc = 0.0f;
    for (auto& c : s->cand) {
        acc += c.first;
        if (r < acc) return c.second;
    }
    return s->cand.back().second;
}

// ----------------------------------------------------------------------------
// prompt templates: byte-identical to prompt.py (INSTRUCT_NO_INPUT, CHAT_PREAMBLE, CHAT_USER,
// CHAT_TURN_SEPARATOR, STOP_STRINGS); tests/test_vicuna_cpp.py compares the token ids.

enum PromptType { PROMPT_NONE, PROMPT_INSTRUCT, PROMPT_CHAT };

static const char* const INSTRUCT_NO_INPUT_HEAD =
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n";
static const char* const INSTRUCT_NO_INPUT_TAIL = "\n\n### Response:\n";
static const char* const CHAT_PREAMBLE =
    "The following is a conversation between an AI assistant called Assistant and a human user "
    "called User. The assistant is intelligent, knowledgeable and polite to answer questions of "
    "user.\n\n";
static const char* const CHAT_USER_HEAD = "User:";
static const char* const CHAT_USER_TAIL = "\n\nAssistant:";
static const char* const CHAT_TURN_SEPARATOR = "\n\n";

static std::vector<std::string> stop_strings(PromptType t) {
    if (t == PROMPT_INSTRUCT) return {"### "};
    if (t == PROMPT_CHAT) return {"\nUser:"};
    return {};
}

struct Turn {
    std::string user, assistant;
};

static void append_ids(std::vector<int>* ids, const std::vector<int>& more) {
    ids->insert(ids->end(), more.begin(), more.end());
}

// prompt.py's build_prompt_ids: the leading special ids (BOS where the tokenizer adds one), then
// each prompt piece and each answered response (+ EOS) encoded on its own.
static std::vector<int> build_prompt_ids(const Tokenizer* t, PromptType type, const std::vector<Turn>& history,
                                         const std::string& user) {
    std::vector<int> ids;
    if (t->add_bos) ids.push_back(t->bos);
    if (type == PROMPT_NONE) {
        append_ids(&ids, tokenizer_encode(t, user, false));
    } else if (type == PROMPT_INSTRUCT) {
        append_ids(&ids, tokenizer_encode(t, INSTRUCT_NO_INPUT_HEAD + user + INSTRUCT_NO_INPUT_TAIL, false));
    } else {
        for (size_t i = 0; i <= history.size(); i++) {
            const std::string& u = i < history.size() ? history[i].user : user;
            std::string prompt = (i == 0 ? CHAT_PREAMBLE : CHAT_TURN_SEPARATOR) + (CHAT_USER_HEAD + u) + CHAT_USER_TAIL;
            append_ids(&ids, tokenizer_encode(t, prompt, false));
            if (i < history.size()) {
                append_ids(&ids, tokenizer_encode(t, history[i].assistant, false));
                if (t->eos >= 0) ids.push_back(t->eos);
            }
        }
    }
    return ids;
}

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

// Python's str.strip() for the whitespace a model emits
static std::string strip(std::string_view s) {
    size_t a = 0, b = s.size();
    while (a < b && is_space(s[a])) a++;
    while (b > a && is_space(s[b - 1])) b--;
    return std::string(s.substr(a, b - a));
}

// Valid UTF-8 for the terminal: each invalid byte becomes U+FFFD, as HF's decode does. A
// byte-level model can emit any bytes (a tiny random one does).
static std::string utf8_sanitize(std::string_view s) {
    std::string out;
    out.reserve(s.size());
    size_t i = 0;
    while (i < s.size()) {
        uint32_t cp;
        size_t len = utf8_len((const uint8_t*)s.data() + i, s.size() - i, &cp);
        if (len == 0) {
            out += "\xef\xbf\xbd";
            i++;
        } else {
            out.append(s.data() + i, len);
            i += len;
        }
    }
    return out;
}

// Streams generated text, holding back what may still turn into a stop string or is an
// incomplete UTF-8 character; like prompt.py's StopStringFilter. What it prints is valid UTF-8.
struct StreamPrinter {
    std::vector<std::string> stops;
    FILE* out = nullptr;  // nullptr: collect only
    std::string text;     // everything generated
    size_t printed = 0;
    size_t cut = std::string::npos;  // where the first stop string starts
};

static void printer_emit(StreamPrinter* p, size_t end) {
    if (end > p->printed) {
        if (p->out) {
            std::string clean = utf8_sanitize(std::string_view(p->text).substr(p->printed, end - p->printed));
            fwrite(clean.data(), 1, clean.size(), p->out);
            fflush(p->out);
        }
        p->printed = end;
    }
}

// Adds a piece; returns true once a stop string has appeared.
static bool printer_add(StreamPrinter* p, std::string_view piece) {
    p->text.append(piece.data(), piece.size());
    for (const std::string& s : p->stops) {
        size_t pos = p->text.find(s);
        if (pos != std::string::npos) p->cut = std::min(p->cut, pos);
    }
    if (p->cut != std::string::npos) return true;
    size_t hold = utf8_incomplete_tail(p->text);
    for (const std::string& s : p->stops) {
        for (size_t k = std::min(s.size() - 1, p->text.size()); k > hold; k--) {
            if (p->text.compare(p->text.size() - k, k, s, 0, k) == 0) {
                hold = k;
                break;
            }
        }
    }
    if (!p->stops.empty()) {  // trailing spaces are cut at the end (rstrip), so hold them too
        size_t n = p->text.size() - hold;
        while (n > p->printed && is_space(p->text[n - 1])) n--, hold++;
    }
    printer_emit(p, p->text.size() - hold);
    return false;
}

static void printer_finish(StreamPrinter* p) {
    size_t end = std::min(p->cut, p->text.size());
    if (!p->stops.empty()) {
        while (end > p->printed && is_space(p->text[end - 1])) end--;
    }
    printer_emit(p, end);
}

// Samples up to n_new tokens after ids (which must fit the context); stops at an end-of-generation
// token, a stop string, or a full context. Returns the generated ids.
static std::vector<int> generate(Engine* e, std::vector<int> ids, int n_new, Sampler* s, StreamPrinter* pr,
                                 bool ignore_eos) {
    std::vector<int> out;
    const float* logits = engine_eval(e, ids);
    for (int i = 0; i < n_new; i++) {
        int tok = sampler_sample(s, logits, e->model.cfg.vocab_size, ids);
        if (!ignore_eos && tokenizer_is_eog(&e->tok, tok)) break;
        out.push_back(tok);
        ids.push_back(tok);
        if (pr && printer_add(pr, token_text(&e->tok, tok))) break;
        if (i + 1 == n_new || (int)ids.size() >= e->kv.n_ctx) break;
        logits = engine_eval(e, ids);
    }
    return out;
}

// ----------------------------------------------------------------------------
// quantize: rewrite a GGUF with its 2-D F32/F16 tensors in a block type
//
// Like llama.cpp, the classifier (output.weight, or token_embd.weight when the embeddings are
// tied) is kept at 8 bits when the target is a 4-bit type: its errors land directly on the
// logits. On SmolLM2-135M that is the difference between +12 % and +50 % perplexity for q4_0.
// `pure` quantizes it like everything else. `requantize` also converts tensors that are already
// quantized (through f32: the result carries the errors of both formats).

static void quantize_file(const char* in_path, const char* out_path, uint32_t type, bool pure, bool requantize) {
    GGUFFile f;
    gguf_init_from_file(&f, in_path);
    struct Plan {
        const GGUFTensor* t;
        uint32_t type;
        uint64_t offset, n_bytes;
    };
    std::vector<Plan> plan;
    uint64_t off = 0;
    bool tied = gguf_find_tensor(&f, "output.weight") == nullptr;
    for (const GGUFTensor& t : f.tensors) {
        bool is_float = t.type == GGML_TYPE_F32 || t.type == GGML_TYPE_F16;
        bool convert = (is_float || (requantize && t.type != type)) && t.n_dims == 2 &&
                       t.ne[0] % ggml_type_info(type).block == 0;
        bool classifier = t.name == "output.weight" || (tied && t.name == "token_embd.weight");
        bool four_bit = type == GGML_TYPE_Q4_0 || type == GGML_TYPE_Q4_1;
        uint32_t nt = !convert ? t.type : (classifier && four_bit && !pure) ? GGML_TYPE_Q8_0 : type;
        TypeInfo ti = ggml_type_info(nt);
        uint64_t n_bytes = t.n_elements / ti.block * ti.block_size;
        plan.push_back({&t, nt, off, n_bytes});
        off += n_bytes;
        off += (f.alignment - off % f.alignment) % f.alignment;
    }
    uint32_t ftype = type == GGML_TYPE_Q8_0 ? GGUF_FTYPE_MOSTLY_Q8_0
                     : type == GGML_TYPE_Q4_0 ? GGUF_FTYPE_MOSTLY_Q4_0
                     : type == GGML_TYPE_Q4_1 ? GGUF_FTYPE_MOSTLY_Q4_1
                     : type == GGML_TYPE_F16 ? GGUF_FTYPE_MOSTLY_F16 : GGUF_FTYPE_ALL_F32;
    bool has_ftype = gguf_find(&f, "general.file_type") != nullptr;

    GGUFWriter w;
    gguf_writer_open(&w, out_path);
    try {
        gguf_write_val<uint32_t>(&w, GGUF_MAGIC);
        gguf_write_val<uint32_t>(&w, GGUF_VERSION);
        gguf_write_val<uint64_t>(&w, f.tensors.size());
        gguf_write_val<uint64_t>(&w, f.kvs.size() + (has_ftype ? 0 : 1));
        for (const GGUFKV& kv : f.kvs) {
            if (kv.key == "general.file_type") continue;
            gguf_write(&w, f.data + kv.raw_begin, (size_t)(kv.raw_end - kv.raw_begin));  // verbatim
        }
        gguf_write_str(&w, "general.file_type");
        gguf_write_val<uint32_t>(&w, GGUF_TYPE_UINT32);
        gguf_write_val<uint32_t>(&w, ftype);
        for (const Plan& p : plan) {
            gguf_write_str(&w, p.t->name);
            gguf_write_val<uint32_t>(&w, p.t->n_dims);
            for (uint32_t d = 0; d < p.t->n_dims; d++) gguf_write_val<uint64_t>(&w, p.t->ne[d]);
            gguf_write_val<uint32_t>(&w, p.type);
            gguf_write_val<uint64_t>(&w, p.offset);
        }
        gguf_write_pad(&w, f.alignment);
        uint64_t data_start = w.off;
        std::vector<float> row;
        std::vector<uint8_t> qrow;
        for (const Plan& p : plan) {
            gguf_write_pad(&w, f.alignment);
            if (w.off - data_start != p.offset) FAIL("internal error: tensor offset mismatch");
            if (p.type == p.t->type) {
                gguf_write(&w, p.t->data, (size_t)p.t->n_bytes);
                continue;
            }
            int64_t cols = (int64_t)p.t->ne[0], rows = (int64_t)(p.t->n_elements / p.t->ne[0]);
            size_t in_row = (size_t)(p.t->n_bytes / rows), out_row = (size_t)(p.n_bytes / rows);
            row.resize(cols);
            qrow.resize(out_row);
            for (int64_t r = 0; r < rows; r++) {
                dequantize_row(p.t->type, p.t->data + r * in_row, row.data(), cols);
                quantize_row(p.type, row.data(), qrow.data(), cols);
                gguf_write(&w, qrow.data(), out_row);
            }
        }
        gguf_writer_close(&w, true);
    } catch (...) {
        gguf_writer_close(&w, false);
        gguf_free(&f);
        throw;
    }
    gguf_free(&f);
}

// ----------------------------------------------------------------------------
// command line

static const char* const USAGE =
    "usage: vicuna COMMAND [options]\n"
    "\n"
    "commands:\n"
    "  run        -m F.gguf -p TEXT [-n N] [-t THREADS] [-c CTX] [--temp T] [--top-k K] [--top-p P]\n"
    "             [--repeat-penalty R] [--seed S] [--prompt-type none|instruct|chat] [--ids 1,2,3]\n"
    "             [--print-ids] [--ignore-eos]     print a completion, streaming (--temp 0: greedy)\n"
    "  chat       -m F.gguf [--prompt-type chat|instruct] [-n N] [-c CTX] [sampling options]\n"
    "             interactive chat on stdin (/clear forgets the history, /exit quits)\n"
    "  tokenize   -m F.gguf (-p TEXT | -f FILE [--lines]) [--prompt-type T] [--no-bos]\n"
    "             print token ids; --lines: one text per line, \\n \\t \\r \\\\ escapes, one line of ids each\n"
    "  eval       -m F.gguf (-p TEXT | --ids 1,2,3) --dump-logits OUT.bin\n"
    "             write the last position's logits (vocab float32, little-endian)\n"
    "  bench      -m F.gguf [-t THREADS] [-p 512] [-n 128] [-v]\n"
    "             time a prompt and a generation: prints 'prefill: X tok/s' and 'decode: Y tok/s'\n"
    "             (-v adds wall and CPU seconds per phase on stderr)\n"
    "  perplexity -m F.gguf -f TEXT.txt [-c CTX] [--chunks N]\n"
    "             perplexity over a text (the first N chunks of CTX tokens), as llama.cpp computes it\n"
    "  quantize   IN.gguf OUT.gguf TYPE [--pure] [--allow-requantize] [--overwrite]\n"
    "             f32/f16 tensors -> q8_0, q4_0, q4_1 (or f16); for 4-bit types the classifier stays\n"
    "             q8_0 unless --pure; --allow-requantize also converts already quantized tensors;\n"
    "             an existing OUT is replaced only with --overwrite\n";

struct Options {
    std::string command;
    std::vector<std::string> positional;
    std::string model, prompt, file, ids, dump_logits;
    PromptType prompt_type = PROMPT_NONE;
    bool prompt_type_set = false;
    int n_predict = 256, n_prompt = 512, threads = 0, ctx = 0, chunks = 0;
    bool n_predict_set = false, prompt_set = false;
    float temp = 0.7f, top_p = 0.9f, repeat_penalty = 1.1f;
    int top_k = 40;
    int64_t seed = -1;
    bool print_ids = false, ignore_eos = false, no_bos = false, lines = false, pure = false, verbose = false, requantize = false,
         overwrite = false;
};

static long parse_int(const std::string& flag, const char* v, long lo, long hi) {
    char* end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi) {
        FAIL("%s expects an integer in [%ld, %ld], got '%s'", flag.c_str(), lo, hi, printable(v).c_str());
    }
    return x;
}

static float parse_float(const std::string& flag, const char* v, float lo, float hi) {
    char* end;
    errno = 0;
    float x = strtof(v, &end);
    if (errno || *end || end == v || !(x >= lo && x <= hi)) {
        FAIL("%s expects a number in [%g, %g], got '%s'", flag.c_str(), lo, hi, printable(v).c_str());
    }
    return x;
}

static std::vector<int> parse_ids(const std::string& s) {
    std::vector<int> ids;
    size_t i = 0;
    while (i < s.size()) {
        size_t j = s.find_first_of(", ", i);
        if (j == std::string::npos) j = s.size();
        if (j > i) ids.push_back((int)parse_int("--ids", s.substr(i, j - i).c_str(), 0, INT32_MAX));
        i = j + 1;
    }
    if (ids.empty()) FAIL("--ids expects comma-separated token ids, got '%s'", printable(s).c_str());
    return ids;
}

static Options parse_args(int argc, char** argv) {
    Options o;
    o.command = argv[1];
    // which flags each command takes
    static const std::unordered_map<std::string, std::string> allowed = {
        {"run", " -m -p -n -t -c --temp --top-k --top-p --repeat-penalty --seed --prompt-type --ids --print-ids --ignore-eos "},
        {"chat", " -m -n -t -c --temp --top-k --top-p --repeat-penalty --seed --prompt-type "},
        {"tokenize", " -m -p -f --lines --prompt-type --no-bos "},
        {"eval", " -m -p --ids --dump-logits -t "},
        {"bench", " -m -p -n -t -v "},
        {"perplexity", " -m -f -c -t --chunks "},
        {"quantize", " --pure --allow-requantize --overwrite "},
    };
    auto cmd = allowed.find(o.command);
    if (cmd == allowed.end()) FAIL("unknown command '%s'; run 'vicuna --help'", printable(o.command).c_str());
    for (int i = 2; i < argc; i++) {
        std::string a = argv[i];
        if (a.size() < 2 || a[0] != '-') {
            o.positional.push_back(a);
            continue;
        }
        if (cmd->second.find(" " + a + " ") == std::string::npos) {
            FAIL("'%s' does not take %s; run 'vicuna --help'", o.command.c_str(), printable(a).c_str());
        }
        if (a == "--print-ids") { o.print_ids = true; continue; }
        if (a == "--ignore-eos") { o.ignore_eos = true; continue; }
        if (a == "--no-bos") { o.no_bos = true; continue; }
        if (a == "--lines") { o.lines = true; continue; }
        if (a == "--pure") { o.pure = true; continue; }
        if (a == "--allow-requantize") { o.requantize = true; continue; }
        if (a == "--overwrite") { o.overwrite = true; continue; }
        if (a == "-v") { o.verbose = true; continue; }
        if (i + 1 >= argc) FAIL("%s needs a value", a.c_str());
        const char* v = argv[++i];
        if (a == "-m") o.model = v;
        else if (a == "-p" && o.command == "bench") o.n_prompt = (int)parse_int(a, v, 1, 1 << 20);
        else if (a == "-p") { o.prompt = v; o.prompt_set = true; }
        else if (a == "-f") o.file = v;
        else if (a == "-n") { o.n_predict = (int)parse_int(a, v, 0, 1 << 20); o.n_predict_set = true; }
        else if (a == "-t") o.threads = (int)parse_int(a, v, 1, 256);
        else if (a == "-c") o.ctx = (int)parse_int(a, v, 1, 1 << 24);
        else if (a == "--chunks") o.chunks = (int)parse_int(a, v, 1, 1 << 24);
        else if (a == "--temp") o.temp = parse_float(a, v, 0.0f, 100.0f);
        else if (a == "--top-k") o.top_k = (int)parse_int(a, v, 0, 1 << 24);
        else if (a == "--top-p") o.top_p = parse_float(a, v, 0.0f, 1.0f);
        else if (a == "--repeat-penalty") o.repeat_penalty = parse_float(a, v, 0.01f, 100.0f);
        else if (a == "--seed") o.seed = parse_int(a, v, -1, INT32_MAX);
        else if (a == "--ids") o.ids = v;
        else if (a == "--dump-logits") o.dump_logits = v;
        else if (a == "--prompt-type") {
            std::string t = v;
            o.prompt_type_set = true;
            if (t == "none") o.prompt_type = PROMPT_NONE;
            else if (t == "instruct") o.prompt_type = PROMPT_INSTRUCT;
            else if (t == "chat") o.prompt_type = PROMPT_CHAT;
            else FAIL("--prompt-type must be none, instruct or chat, got '%s'", printable(t).c_str());
        }
    }
    if (o.command != "quantize") {
        if (!o.positional.empty()) FAIL("unexpected argument '%s'", printable(o.positional[0]).c_str());
        if (o.model.empty()) FAIL("'%s' needs a model: -m F.gguf", o.command.c_str());
    }
    return o;
}

static Sampler make_sampler(const Options& o) {
    Sampler s;
    s.temp = o.temp;
    s.top_k = o.top_k;
    s.top_p = o.top_p;
    s.repeat_penalty = o.repeat_penalty;
    sampler_seed(&s, o.seed >= 0 ? (uint64_t)o.seed : (uint64_t)std::chrono::steady_clock::now().time_since_epoch().count());
    return s;
}

static std::string read_file(const std::string& path) {
    FILE* fp = fopen(path.c_str(), "rb");
    if (!fp) FAIL("cannot open '%s': %s", printable(path).c_str(), strerror(errno));
    std::string s;
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, fp)) > 0) s.append(buf, n);
    bool err = ferror(fp);
    fclose(fp);
    if (err) FAIL("cannot read '%s'", printable(path).c_str());
    return s;
}

static int cmd_run(const Options& o) {
    if (o.ids.empty() && !o.prompt_set) FAIL("run needs a prompt: -p TEXT (or --ids 1,2,3)");
    Engine e;
    engine_init(&e, o.model.c_str(), o.ctx, o.threads);
    std::vector<int> ids = o.ids.empty() ? build_prompt_ids(&e.tok, o.prompt_type, {}, o.prompt) : parse_ids(o.ids);
    if ((int)ids.size() >= e.kv.n_ctx) {
        FAIL("the prompt is %zu tokens and the context %d; raise -c (the model allows %d)", ids.size(), e.kv.n_ctx,
             e.model.cfg.ctx_train);
    }
    Sampler s = make_sampler(o);
    StreamPrinter pr;
    pr.stops = stop_strings(o.prompt_type);
    pr.out = o.print_ids ? nullptr : stdout;
    int n_new = std::min(o.n_predict, e.kv.n_ctx - (int)ids.size());
    std::vector<int> gen = n_new > 0 ? generate(&e, ids, n_new, &s, &pr, o.ignore_eos) : std::vector<int>();
    if (o.print_ids) {
        for (size_t i = 0; i < gen.size(); i++) printf(i ? " %d" : "%d", gen[i]);
    } else {
        printer_finish(&pr);
    }
    printf("\n");
    engine_free(&e);
    return 0;
}

static int cmd_chat(const Options& o) {
    Engine e;
    engine_init(&e, o.model.c_str(), o.ctx, o.threads);
    PromptType type = o.prompt_type_set ? o.prompt_type : PROMPT_CHAT;
    if (e.kv.n_ctx < 16) FAIL("chat needs a context of at least 16 tokens, got -c %d", e.kv.n_ctx);
    if (type == PROMPT_NONE) FAIL("chat needs a template: --prompt-type chat or instruct");
    Sampler s = make_sampler(o);
    const int n_ctx = e.kv.n_ctx;
    // room for the answer: -n, but never more than half the context
    const int max_new = std::max(1, std::min(o.n_predict_set ? o.n_predict : 256, n_ctx / 2));
    bool tty = isatty(0);
    std::vector<Turn> history;
    std::string line;
    for (;;) {
        if (tty) {
            fputs("> ", stdout);
            fflush(stdout);
        }
        if (!std::getline(std::cin, line)) break;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (strip(line).empty()) continue;
        if (line == "/exit" || line == "/quit") break;
        if (line == "/clear") {
            history.clear();
            continue;
        }
        // prompt.py's fit_history: drop the oldest turns until the prompt and the answer fit
        std::vector<Turn> turns = type == PROMPT_CHAT ? history : std::vector<Turn>();
        std::vector<int> ids = build_prompt_ids(&e.tok, type, turns, line);
        while ((int)ids.size() + max_new > n_ctx && !turns.empty()) {
            turns.erase(turns.begin());
            ids = build_prompt_ids(&e.tok, type, turns, line);
        }
        if ((int)ids.size() + max_new > n_ctx) {
            // the question alone is too long: keep its end (which holds the "Assistant:" cue)
            size_t lead = e.tok.add_bos ? 1 : 0, keep = (size_t)(n_ctx - max_new) - lead;
            fprintf(stderr, "chat: note: your message is %zu tokens; kept its last %zu to fit the context of %d (-c)\n",
                    ids.size(), keep, n_ctx);
            ids.erase(ids.begin() + lead, ids.end() - keep);
        }
        StreamPrinter pr;
        pr.stops = stop_strings(type);
        pr.out = stdout;
        generate(&e, ids, std::min(max_new, n_ctx - (int)ids.size()), &s, &pr, false);
        printer_finish(&pr);
        printf("\n");
        fflush(stdout);
        history = turns;
        history.push_back({line, strip(std::string_view(pr.text).substr(0, std::min(pr.cut, pr.text.size())))});
    }
    engine_free(&e);
    return 0;
}

// "a\nb" written as a\\nb on one line
static std::string unescape(std::string_view s) {
    std::string out;
    for (size_t i = 0; i < s.size(); i++) {
        if (s[i] == '\\' && i + 1 < s.size()) {
            char c = s[i + 1];
            if (c == 'n' || c == 't' || c == 'r' || c == '\\') {
                out += c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : '\\';
                i++;
                continue;
            }
        }
        out += s[i];
    }
    return out;
}

static void print_ids(const std::vector<int>& ids) {
    std::string line;
    for (size_t i = 0; i < ids.size(); i++) {
        if (i) line += ' ';
        line += std::to_string(ids[i]);
    }
    line += '\n';
    fwrite(line.data(), 1, line.size(), stdout);
}

// The tokenizer alone: no weights are touched, so this is also what the fuzz test drives.
static int cmd_tokenize(const Options& o) {
    if (o.prompt_set == !o.file.empty()) FAIL("tokenize needs exactly one of -p TEXT or -f FILE");
    GGUFFile f;
    gguf_init_from_file(&f, o.model.c_str());
    Tokenizer t;
    try {
        tokenizer_init(&t, &f);
        auto encode = [&](const std::string& text) {
            if (o.prompt_type != PROMPT_NONE) return build_prompt_ids(&t, o.prompt_type, {}, text);
            return tokenizer_encode(&t, text, !o.no_bos);
        };
        if (o.prompt_set) {
            print_ids(encode(o.prompt));
        } else if (!o.lines) {
            print_ids(encode(read_file(o.file)));
        } else {
            std::string all = read_file(o.file);
            size_t i = 0;
            while (i < all.size()) {
                size_t j = all.find('\n', i);
                if (j == std::string::npos) j = all.size();
                print_ids(encode(unescape(std::string_view(all).substr(i, j - i))));
                i = j + 1;
            }
        }
    } catch (...) {
        gguf_free(&f);
        throw;
    }
    gguf_free(&f);
    return 0;
}

static int cmd_eval(const Options& o) {
    if (o.dump_logits.empty()) FAIL("eval needs --dump-logits OUT.bin");
    if (o.ids.empty() == !o.prompt_set) FAIL("eval needs exactly one of -p TEXT or --ids 1,2,3");
    GGUFFile f;
    gguf_init_from_file(&f, o.model.c_str());
    Tokenizer t;
    std::vector<int> ids;
    try {
        tokenizer_init(&t, &f);
        ids = o.prompt_set ? tokenizer_encode(&t, o.prompt, true) : parse_ids(o.ids);
    } catch (...) {
        gguf_free(&f);
        throw;
    }
    gguf_free(&f);
    if (ids.empty()) FAIL("the prompt has no tokens");
    Engine e;
    engine_init(&e, o.model.c_str(), std::max((int)ids.size(), 1), o.threads);
    const float* logits = engine_eval(&e, ids);
    FILE* fp = fopen(o.dump_logits.c_str(), "wb");
    if (!fp) FAIL("cannot create '%s': %s", printable(o.dump_logits).c_str(), strerror(errno));
    size_t n = (size_t)e.model.cfg.vocab_size;
    bool ok = fwrite(logits, sizeof(float), n, fp) == n;  // x86 and ARM are little-endian
    ok = (fclose(fp) == 0) && ok;
    if (!ok) FAIL("cannot write '%s': %s", printable(o.dump_logits).c_str(), strerror(errno));
    engine_free(&e);
    return 0;
}

static int cmd_bench(const Options& o) {
    int n_prompt = o.n_prompt, n_gen = o.n_predict_set ? o.n_predict : 128;
    if (n_gen < 1) FAIL("bench needs -n >= 1");
    Engine e;
    GGUFFile probe;  // the context must hold the prompt and the generation
    gguf_init_from_file(&probe, o.model.c_str());
    int ctx_train = (int)gguf_get_int(&probe, "llama.context_length", 2048, false, 1, 1 << 24);
    gguf_free(&probe);
    if (n_prompt + n_gen > ctx_train) {
        FAIL("-p %d plus -n %d exceed the model's context of %d", n_prompt, n_gen, ctx_train);
    }
    engine_init(&e, o.model.c_str(), n_prompt + n_gen, o.threads);
    int V = e.model.cfg.vocab_size;
    std::vector<int> prompt(n_prompt);
    for (int i = 0; i < n_prompt; i++) prompt[i] = (int)((i * 7919u + 13u) % (unsigned)V);
    float* logits = e.logits.data();
    engine_forward(&e, prompt.data(), std::min(n_prompt, 16), 0, logits, false);  // warm-up: page in weights
    engine_forward(&e, prompt.data(), 1, 16, logits, false);

    double t0 = time_s(), c0 = cpu_time_s();
    engine_forward(&e, prompt.data(), n_prompt, 0, logits, false);
    double t1 = time_s(), c1 = cpu_time_s();
    for (int i = 0; i < n_gen; i++) {
        int tok = (int)(std::max_element(logits, logits + V) - logits);
        engine_forward(&e, &tok, 1, n_prompt + i, logits, false);
    }
    double t2 = time_s(), c2 = cpu_time_s();
    printf("prefill: %.2f tok/s\n", n_prompt / (t1 - t0));
    printf("decode: %.2f tok/s\n", n_gen / (t2 - t1));
    if (o.verbose) {  // CPU seconds tell how much work a phase was when other jobs share the cores
        fprintf(stderr, "bench: prefill %.3f s wall %.3f s cpu, decode %.3f s wall %.3f s cpu, %d threads\n",
                t1 - t0, c1 - c0, t2 - t1, c2 - c1, e.pool.n_threads);
    }
    engine_free(&e);
    return 0;
}

// llama.cpp's perplexity: cut the text into chunks of n_ctx tokens, run each chunk from an empty
// cache, and score the second half of each (those tokens see at least n_ctx/2 of context).
static int cmd_perplexity(const Options& o) {
    if (o.file.empty()) FAIL("perplexity needs a text file: -f TEXT.txt");
    std::string text = read_file(o.file);
    Engine e;
    engine_init(&e, o.model.c_str(), o.ctx > 0 ? o.ctx : 512, o.threads);
    int n_ctx = e.kv.n_ctx, V = e.model.cfg.vocab_size;
    std::vector<int> tokens = tokenizer_encode(&e.tok, text, true);
    int n_chunks = (int)(tokens.size() / (size_t)n_ctx);
    if (o.chunks > 0) n_chunks = std::min(n_chunks, o.chunks);
    if (n_chunks == 0 || n_ctx < 4) {
        FAIL("'%s' is %zu tokens, less than one context of %d; use a longer text or a smaller -c",
             printable(o.file).c_str(), tokens.size(), n_ctx);
    }
    std::vector<float> logits((size_t)n_ctx * V);
    double nll = 0.0, nll2 = 0.0;
    long count = 0;
    int first = n_ctx / 2;
    for (int ch = 0; ch < n_chunks; ch++) {
        std::vector<int> chunk(tokens.begin() + (size_t)ch * n_ctx, tokens.begin() + (size_t)(ch + 1) * n_ctx);
        if (e.tok.add_bos) chunk[0] = e.tok.bos;  // every chunk starts like a document
        engine_forward(&e, chunk.data(), n_ctx, 0, logits.data(), true);
        for (int j = first; j < n_ctx - 1; j++) {
            const float* l = &logits[(size_t)j * V];
            float max = *std::max_element(l, l + V);
            double sum = 0.0;
            for (int v = 0; v < V; v++) sum += std::exp((double)l[v] - max);
            double lp = (double)l[chunk[j + 1]] - max - std::log(sum);
            nll -= lp;
            nll2 += lp * lp;
            count++;
        }
        printf("[%d]%.4f,", ch + 1, std::exp(nll / count));
        fflush(stdout);
    }
    double mean = nll / count, var = nll2 / count - mean * mean;
    double err = count > 1 ? std::sqrt(std::max(0.0, var) / (count - 1)) : 0.0;
    printf("\nFinal estimate: PPL = %.4f +/- %.5f\n", std::exp(mean), std::exp(mean) * err);
    engine_free(&e);
    return 0;
}

static int cmd_quantize(const Options& o) {
    if (o.positional.size() != 3) FAIL("usage: vicuna quantize IN.gguf OUT.gguf TYPE (TYPE: q8_0, q4_0, q4_1, f16)");
    const std::string& t = o.positional[2];
    uint32_t type = t == "q8_0" ? GGML_TYPE_Q8_0 : t == "q4_0" ? GGML_TYPE_Q4_0 : t == "q4_1" ? GGML_TYPE_Q4_1
                  : t == "f16" ? GGML_TYPE_F16 : 0xffffffffu;
    if (type == 0xffffffffu) FAIL("unknown quantization type '%s' (q8_0, q4_0, q4_1, f16)", printable(t).c_str());
    if (o.positional[0] == o.positional[1]) FAIL("the output must not overwrite the input '%s'", printable(o.positional[0]).c_str());
    struct stat st;
    const char* out = o.positional[1].c_str();
    if (lstat(out, &st) == 0) {
        if (S_ISDIR(st.st_mode)) FAIL("the output '%s' is a directory; name a .gguf file", printable(out).c_str());
        if (!o.overwrite) FAIL("the output '%s' exists; pass --overwrite to replace it", printable(out).c_str());
    }
    quantize_file(o.positional[0].c_str(), o.positional[1].c_str(), type, o.pure, o.requantize);
    return 0;
}

// The CLI, callable from test.cpp: returns the exit status, prints errors as one line.
static int vicuna_main(int argc, char** argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        fputs(USAGE, argc < 2 ? stderr : stdout);
        return argc < 2 ? 1 : 0;
    }
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(USAGE, stdout);
            return 0;
        }
    }
    try {
        Options o = parse_args(argc, argv);
        if (o.command == "run") return cmd_run(o);
        if (o.command == "chat") return cmd_chat(o);
        if (o.command == "tokenize") return cmd_tokenize(o);
        if (o.command == "eval") return cmd_eval(o);
        if (o.command == "bench") return cmd_bench(o);
        if (o.command == "perplexity") return cmd_perplexity(o);
        if (o.command == "quantize") return cmd_quantize(o);
    } catch (const Error& e) {
        fflush(stdout);
        fprintf(stderr, "%s\n", e.what());
        return 1;
    } catch (const std::bad_alloc&) {
        fflush(stdout);
        fprintf(stderr, "vicuna: error: out of memory; try a smaller context (-c)\n");
        return 1;
    }
    return 1;
}

#ifndef TESTING
int main(int argc, char** argv) { return vicuna_main(argc, argv); }
#endif
