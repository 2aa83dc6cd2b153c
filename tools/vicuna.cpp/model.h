// model.h: the weights of a LLaMA-family model, pointed into a parsed GGUF file.
//
// model_init reads the <arch>.* hyperparameters into a Config, checks every tensor's shape against
// them, and keeps pointers into the mapped file (nothing is copied but the norm and bias vectors,
// which are converted to f32). The Model owns the GGUFFile, so the weights live exactly as long as it.
// A LoRA adapter file (lora.h) can be attached to the loaded weights; running the model is forward.h.
//
// Two values of general.architecture, as llama.cpp names and reads them:
//   llama  LLaMA 1/2/3, SmolLM2, Mistral (llama.cpp's converter writes MistralForCausalLM as llama):
//          attn_q/attn_k rows permuted so that RoPE rotates adjacent pairs (LLAMA_ROPE_TYPE_NORM);
//          optional rope_freqs (LLaMA-3.1 scaling), linear rope scaling, a sliding window (ours)
//   qwen2  Qwen2 / Qwen2.5: q/k/v biases, rows not permuted, RoPE rotates the two halves of each
//          head (LLAMA_ROPE_TYPE_NEOX)
#pragma once

#include <cinttypes>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "gguf.h"

enum ModelArch { ARCH_LLAMA, ARCH_QWEN2 };

struct Config {
    ModelArch arch;   // general.architecture; the metadata keys are "<arch>.*"
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
    bool rope_neox;   // rotate (x[i], x[i + rope_dim/2]) (qwen2) rather than adjacent pairs (llama)
    float rope_freq_scale;  // 1 / llama.rope.scaling.factor for linear scaling, else 1
    int sliding_window;     // a token attends to itself and the sliding_window - 1 positions before
                            // it (llama.attention.sliding_window, Mistral); 0: the whole context
};

struct LoraWeight;

// A weight matrix of shape (rows, cols), row-major; GGUF calls cols ne[0] and rows ne[1].
struct Tensor {
    std::string_view name;
    uint32_t type = GGML_TYPE_F32;
    int64_t rows = 0, cols = 0;
    size_t row_bytes = 0;
    const uint8_t* data = nullptr;  // points into the mmap'ed file
    const LoraWeight* lora = nullptr;  // a LoRA pair applied at run time (lora.h), or none
    // K-quants: the rows repacked in groups of 8 (quants.h's BlockQ4_Kx8/Q5_Kx8/Q6_Kx8) for multiplies of 4 or
    // more tokens, made by forward.h on the first such multiply; decode keeps reading `data`
    mutable std::shared_ptr<std::vector<uint8_t>> packed;
};

// A LoRA adapter's pair on one weight W (rows, cols): forward.h computes
//   y = W x + scale * B (A x)        A = lora_a (rank, cols), B = lora_b (rows, rank)
// without touching W, so a quantized W stays quantized. B is rearranged at load into panels of 8
// rows, each panel k-major (bp[g][k][0..8) = B[8g..8g+8, k]), so that B t for a run of rows is
// rank vector multiply-adds over contiguous memory: no horizontal sums, one stream. On token_embd
// (an embedding lookup, as llama.cpp stores it) A is (vocab, rank) and the token's row of A goes
// through B (dim, rank). A points into the adapter file when it is F32/F16 (else an F32 copy); bp
// is F16 when the file's B is F16, else F32.
struct LoraWeight {
    Tensor a;                   // (rank, cols), or (vocab, rank) on token_embd
    Tensor bp;                  // B in panels: rows = rank, cols = rows of W (dim on token_embd), padded to 8
    int rank = 0;
    float scale = 0.0f;         // --lora-scale * adapter.lora.alpha / rank (the scale alone when alpha is 0)
    std::vector<float> a_f32;   // a's data when the file's A is not F32/F16
    std::vector<float> bp_f32;  // bp's data: one of these two
    std::vector<uint16_t> bp_f16;
};

// The adapter attached to a model: its file (the mapping A and B point into) and one LoraWeight
// per adapted base weight. weights never grows after lora_attach, so the pointers stay valid.
struct Adapter {
    GGUFFile file;
    std::vector<LoraWeight> weights;
    std::string prompt_type;    // vicuna.prompt_type of the adapter (what it was trained with), or ""
    float alpha = 0.0f, scale = 1.0f;
    bool merged = false;        // merged into the weights at load (lora.h's LORA_MERGE) rather than at run time
    std::vector<std::vector<uint8_t>> merged_data;  // W + scale B A per merged weight, in W's type
};

struct LayerWeights {
    std::vector<float> attn_norm;  // (dim,)
    Tensor wq;                     // (n_heads*head_dim, dim)    rows permuted for interleaved RoPE, see rope()
    Tensor wk;                     // (n_kv_heads*head_dim, dim) likewise
    Tensor wv;                     // (n_kv_heads*head_dim, dim)
    std::vector<float> bq, bk, bv; // (n_heads*head_dim,), (n_kv_heads*head_dim,) x2: biases (qwen2), or empty
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
    std::vector<float> rope_inv_freq;  // (rope_dim/2,) theta^(-2i/rope_dim) * freq_scale / rope_freqs[i]
    Adapter adapter;                 // a LoRA adapter file attached with lora_attach (lora.h), if any
};

// A (rows, cols) view of a file tensor, pointing into the mapped file (shape checked by the caller).
static Tensor tensor_view(const GGUFTensor* t, int64_t rows, int64_t cols) {
    Tensor v;
    v.name = t->name;
    v.type = t->type;
    v.rows = rows;
    v.cols = cols;
    v.row_bytes = (size_t)(t->n_bytes / (uint64_t)rows);
    v.data = t->data;
    return v;
}

static Tensor model_matrix(const GGUFFile* f, const std::string& name, int64_t rows, int64_t cols) {
    const GGUFTensor* t = gguf_find_tensor(f, name);
    if (!t) {
        FAIL("'%s' lacks the tensor '%s'; is it a LLaMA model exported by tools/convert_gguf.py?",
             printable(f->path).c_str(), name.c_str());
    }
    if (t->n_dims != 2 || (int64_t)t->ne[0] != cols || (int64_t)t->ne[1] != rows) {
        FAIL("'%s': tensor '%s' has shape [%" PRIu64 ", %" PRIu64 ", %" PRIu64 "] (%u dims), expected [%" PRId64
             ", %" PRId64 "] from the <arch>.* metadata", printable(f->path).c_str(), name.c_str(), t->ne[0],
             t->ne[1], t->ne[2], t->n_dims, cols, rows);
    }
    size_t align = t->type == GGML_TYPE_F32 ? 4 : 2;
    if ((uintptr_t)t->data % align != 0) {
        FAIL("'%s': tensor '%s' data is not %zu-byte aligned (general.alignment = %" PRIu64 ")",
             printable(f->path).c_str(), name.c_str(), align, f->alignment);
    }
    return tensor_view(t, rows, cols);
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

// The metadata key prefix of a file's architecture ("llama." or "qwen2."); FAILs on any other.
static std::string model_arch_prefix(const GGUFFile* f) {
    std::string_view arch = gguf_get_str(f, "general.architecture", true);
    if (arch != "llama" && arch != "qwen2") {
        FAIL("'%s' is a '%s' model; vicuna runs the llama (LLaMA, SmolLM2, Mistral) and qwen2 (Qwen2, Qwen2.5) "
             "architectures", printable(f->path).c_str(), printable(arch).c_str());
    }
    return std::string(arch) + ".";
}

// Reads the <arch>.* hyperparameters, checks them against the tensor shapes, and points the
// weights into the already parsed file. Takes ownership of *file (left empty).
static void model_init(Model* m, GGUFFile* file) {
    m->file = std::move(*file);
    *file = GGUFFile();
    const GGUFFile* f = &m->file;
    std::string path = printable(f->path);
    const std::string a = model_arch_prefix(f);
    const char* ap = a.c_str();
    Config& c = m->cfg;
    c.arch = a == "qwen2." ? ARCH_QWEN2 : ARCH_LLAMA;
    c.rope_neox = c.arch == ARCH_QWEN2;  // llama.cpp's llama_model_rope_type: QWEN2 is NEOX, LLAMA is NORM
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
        FAIL("'%s': %srope.freq_base = %g is not a positive number", path.c_str(), ap, c.rope_theta);
    }
    if (!(c.norm_eps > 0.0f) || !(c.norm_eps < 1.0f)) {
        FAIL("'%s': %sattention.layer_norm_rms_epsilon = %g is not in (0, 1)", path.c_str(), ap, c.norm_eps);
    }
    // RoPE scaling: none, linear (positions divided by the factor, llama.cpp's freq_scale), or the
    // per-frequency divisors of a rope_freqs tensor (LLaMA-3.1, below). YaRN and LongRoPE change the
    // attention too; running them without that would be a silently different model.
    std::string_view scaling = gguf_get_str(f, (a + "rope.scaling.type").c_str(), false);
    c.rope_freq_scale = 1.0f;
    if (scaling == "linear") {
        double factor = gguf_get_float(f, (a + "rope.scaling.factor").c_str(), 0.0);
        if (!(factor >= 1.0) || !std::isfinite(factor)) {
            FAIL("'%s': %srope.scaling.factor = %g; linear RoPE scaling needs a factor >= 1", path.c_str(), ap, factor);
        }
        c.rope_freq_scale = (float)(1.0 / factor);
    } else if (!scaling.empty() && scaling != "none") {
        FAIL("'%s': %srope.scaling.type '%s' is not supported (vicuna runs none, linear and LLaMA-3.1's "
             "rope_freqs)", path.c_str(), ap, printable(scaling).c_str());
    }
    c.sliding_window = model_int(f, a + "attention.sliding_window", 0, false, 0, 1 << 24);
    if (gguf_find(f, a + "attention.sliding_window_pattern")) {
        FAIL("'%s': %sattention.sliding_window_pattern (sliding and full attention layers mixed) is not "
             "supported", path.c_str(), ap);
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
    size_t n_used = 0;  // tensors read, to refuse any other (an output bias, a fused qkv, experts, ...)
    auto optional_vector = [&](const std::string& name, int64_t n) {
        if (!gguf_find_tensor(f, name)) return std::vector<float>();
        n_used++;
        return model_vector(f, name, n);
    };
    m->token_embd = model_matrix(f, "token_embd.weight", c.vocab_size, c.dim);
    m->layers.resize(c.n_layers);
    for (int l = 0; l < c.n_layers; l++) {
        LayerWeights& w = m->layers[l];
        std::string p = "blk." + std::to_string(l) + ".";
        w.attn_norm = model_vector(f, p + "attn_norm.weight", c.dim);
        w.wq = model_matrix(f, p + "attn_q.weight", q_dim, c.dim);
        w.wk = model_matrix(f, p + "attn_k.weight", kv_dim, c.dim);
        w.wv = model_matrix(f, p + "attn_v.weight", kv_dim, c.dim);
        w.bq = optional_vector(p + "attn_q.bias", q_dim);  // qwen2; llama.cpp reads them for llama too
        w.bk = optional_vector(p + "attn_k.bias", kv_dim);
        w.bv = optional_vector(p + "attn_v.bias", kv_dim);
        w.wo = model_matrix(f, p + "attn_output.weight", c.dim, q_dim);
        w.ffn_norm = model_vector(f, p + "ffn_norm.weight", c.dim);
        w.w_gate = model_matrix(f, p + "ffn_gate.weight", c.hidden_dim, c.dim);
        w.w_up = model_matrix(f, p + "ffn_up.weight", c.hidden_dim, c.dim);
        w.w_down = model_matrix(f, p + "ffn_down.weight", c.dim, c.hidden_dim);
        n_used += 9;
    }
    m->output_norm = model_vector(f, "output_norm.weight", c.dim);
    n_used += 2;
    if (gguf_find_tensor(f, "output.weight")) {
        m->output = model_matrix(f, "output.weight", c.vocab_size, c.dim);
        n_used++;
    } else {
        m->output = m->token_embd;  // tied embeddings
    }

    // HF computes 1 / theta^(2i/d) in float32; so do we, to agree on the angles. llama.cpp's
    // ggml_rope_ext divides each frequency by rope_freqs[i] (LLaMA-3.1's smooth scaling, written by
    // the converters) and multiplies every angle by freq_scale (linear scaling).
    std::vector<float> freq_factors = c.arch == ARCH_LLAMA ? optional_vector("rope_freqs.weight", c.rope_dim / 2)
                                                           : std::vector<float>();
    m->rope_inv_freq.resize(c.rope_dim / 2);
    for (int i = 0; i < c.rope_dim / 2; i++) {
        float inv = 1.0f / std::pow(c.rope_theta, (float)(2 * i) / (float)c.rope_dim);
        if (!freq_factors.empty()) {
            if (!(freq_factors[i] > 0.0f) || !std::isfinite(freq_factors[i])) {
                FAIL("'%s': rope_freqs.weight[%d] = %g is not a positive number", path.c_str(), i, freq_factors[i]);
            }
            inv /= freq_factors[i];
        }
        m->rope_inv_freq[i] = inv * c.rope_freq_scale;
    }

    if (n_used != f->tensors.size()) {  // llama.cpp also refuses a file with tensors it does not use
        for (const GGUFTensor& t : f->tensors) {
            std::string_view n = t.name;
            bool known = n == "token_embd.weight" || n == "output_norm.weight" || n == "output.weight" ||
                         (n == "rope_freqs.weight" && c.arch == ARCH_LLAMA);
            if (!known && n.substr(0, 4) == "blk.") {
                size_t dot = n.find('.', 4);
                std::string_view rest = dot == std::string_view::npos ? std::string_view() : n.substr(dot + 1);
                int layer = -1;
                if (dot != std::string_view::npos && dot > 4 && dot - 4 <= 4) {
                    layer = 0;
                    for (size_t k = 4; k < dot; k++) {
                        if (n[k] < '0' || n[k] > '9') { layer = -1; break; }
                        layer = layer * 10 + (n[k] - '0');
                    }
                }
                static const char* const per_layer[] = {
                    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_q.bias",
                    "attn_k.bias", "attn_v.bias", "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight",
                    "ffn_up.weight", "ffn_down.weight"};
                if (layer >= 0 && layer < c.n_layers) {
                    for (const char* k : per_layer) known |= rest == k;
                }
            }
            if (!known) {
                FAIL("'%s': tensor '%s' is not part of the %.*s architecture vicuna runs (an unsupported variant: "
                     "biases, fused or extra weights)", path.c_str(), printable(n).c_str(), (int)a.size() - 1, ap);
            }
        }
        FAIL("'%s': %zu tensors, but the %.*s metadata accounts for %zu (a duplicate name?)", path.c_str(),
             f->tensors.size(), (int)a.size() - 1, ap, n_used);
    }
}

static void model_free(Model* m) {  // releases the mapping now rather than at destruction
    *m = Model();
}
