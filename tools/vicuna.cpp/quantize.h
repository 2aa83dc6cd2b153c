// quantize.h: rewrite a GGUF with its F32/F16 matrices in a quantized type (vicuna quantize).
//
// The per-tensor types follow llama.cpp's mixes (quant_mix_type): the classifier (output.weight,
// or token_embd.weight when the embeddings are tied) gets Q6_K for the 4- and 5-bit types, as
// its errors land directly on the logits (on SmolLM2-135M keeping it at 8 bits is the difference
// between +12 % and +50 % perplexity for q4_0); the _m K-quant mixes give attn_v and ffn_down
// Q6_K on the layers llama.cpp picks; a row whose length is not a multiple of 256 falls back to
// a 32-block type. `pure` quantizes every matrix to the one type (fallbacks still apply).
// `requantize` also converts tensors that are already quantized (through f32: the result
// carries the errors of both formats). Metadata is copied verbatim (general.file_type set to
// llama.cpp's LLAMA_FTYPE value); the output is written under a temporary name and renamed into
// place (GGUFWriter).
#pragma once

#include <string_view>
#include <vector>

#include "common.h"
#include "gguf.h"
#include "quants.h"

// The names `vicuna quantize` takes: the mix's base type and llama.cpp's file type. `q4_k` and
// `q5_k` are aliases of the _m mixes, as in llama.cpp's llama-quantize. `f32` with
// --allow-requantize dequantizes a file (what the tests compare with gguf-py's dequantizers).
struct QuantTarget {
    const char* name;
    uint32_t type;   // GGMLType of most matrices
    uint32_t ftype;  // GGUFFileType written to general.file_type
};
static const QuantTarget QUANT_TARGETS[] = {
    {"f32", GGML_TYPE_F32, GGUF_FTYPE_ALL_F32},           {"f16", GGML_TYPE_F16, GGUF_FTYPE_MOSTLY_F16},
    {"q8_0", GGML_TYPE_Q8_0, GGUF_FTYPE_MOSTLY_Q8_0},
    {"q6_k", GGML_TYPE_Q6_K, GGUF_FTYPE_MOSTLY_Q6_K},     {"q5_k_m", GGML_TYPE_Q5_K, GGUF_FTYPE_MOSTLY_Q5_K_M},
    {"q5_k", GGML_TYPE_Q5_K, GGUF_FTYPE_MOSTLY_Q5_K_M},   {"q5_k_s", GGML_TYPE_Q5_K, GGUF_FTYPE_MOSTLY_Q5_K_S},
    {"q5_1", GGML_TYPE_Q5_1, GGUF_FTYPE_MOSTLY_Q5_1},     {"q5_0", GGML_TYPE_Q5_0, GGUF_FTYPE_MOSTLY_Q5_0},
    {"q4_k_m", GGML_TYPE_Q4_K, GGUF_FTYPE_MOSTLY_Q4_K_M}, {"q4_k", GGML_TYPE_Q4_K, GGUF_FTYPE_MOSTLY_Q4_K_M},
    {"q4_k_s", GGML_TYPE_Q4_K, GGUF_FTYPE_MOSTLY_Q4_K_S}, {"q4_1", GGML_TYPE_Q4_1, GGUF_FTYPE_MOSTLY_Q4_1},
    {"q4_0", GGML_TYPE_Q4_0, GGUF_FTYPE_MOSTLY_Q4_0},
};

static const QuantTarget* quant_target(const std::string& name) {
    for (const QuantTarget& t : QUANT_TARGETS) {
        if (name == t.name) return &t;
    }
    return nullptr;
}

// What the mix needs to know of the whole file; the counters advance in file order, as
// llama.cpp's quantize_state_impl does.
struct QuantMix {
    int n_layers = 0;       // llama.block_count
    int n_attn_v = 0;       // tensors named *attn_v.weight
    int i_attn_v = 0, i_ffn_down = 0;
    bool tied = true;       // no output.weight: token_embd.weight is also the classifier
    bool is_70b = false;    // llama.cpp's LLM_TYPE_70B: 80 layers with grouped K/V heads
};

// llama.cpp's tensor type for one matrix of a llama-architecture model, without an importance
// matrix: src/llama-quant.cpp's llama_tensor_get_type -> llama_tensor_get_type_impl (the mix)
// -> tensor_type_fallback (row lengths the type cannot hold), restricted to the file types of
// QUANT_TARGETS. Keep the two in step when llama.cpp changes its mixes.
static uint32_t quant_mix_type(QuantMix* mx, std::string_view name, uint64_t ne0, const QuantTarget& t, bool pure) {
    uint32_t type = t.type;
    if (type == GGML_TYPE_F32 || type == GGML_TYPE_F16) return type;  // not a quantized type: no mix
    auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
    // the middle layers get more bits every third layer, the first and last eighth always
    auto use_more_bits = [](int i, int n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; };
    const uint32_t f = t.ftype;
    if (!pure) {
        if (name == "output.weight" || (mx->tied && name == "token_embd.weight")) {
            if (ne0 % ggml_type_info(type).block != 0) type = GGML_TYPE_Q8_0;
            else if (type != GGML_TYPE_Q8_0) type = GGML_TYPE_Q6_K;
        } else if (name == "token_embd.weight") {
            // the default type
        } else if (has("attn_v.weight")) {
            if ((f == GGUF_FTYPE_MOSTLY_Q4_K_M || f == GGUF_FTYPE_MOSTLY_Q5_K_M) && use_more_bits(mx->i_attn_v, mx->n_attn_v))
                type = GGML_TYPE_Q6_K;
            else if (f == GGUF_FTYPE_MOSTLY_Q4_K_S && mx->i_attn_v < 4)
                type = GGML_TYPE_Q5_K;
            if (mx->is_70b && type == GGML_TYPE_Q4_K) type = GGML_TYPE_Q5_K;
            mx->i_attn_v++;
        } else if (has("ffn_down")) {
            int i = mx->i_ffn_down, n = mx->n_layers;
            if (f == GGUF_FTYPE_MOSTLY_Q4_K_M || f == GGUF_FTYPE_MOSTLY_Q5_K_M) {
                if (use_more_bits(i, n)) type = GGML_TYPE_Q6_K;
            } else if (f == GGUF_FTYPE_MOSTLY_Q4_K_S && i < n / 8) {
                type = GGML_TYPE_Q5_K;
            }
            mx->i_ffn_down++;
        }
    }
    if (ne0 % ggml_type_info(type).block != 0) {  // tensor_type_fallback
        type = type == GGML_TYPE_Q4_K ? GGML_TYPE_Q5_0
             : type == GGML_TYPE_Q5_K ? GGML_TYPE_Q5_1
             : type == GGML_TYPE_Q6_K ? GGML_TYPE_Q8_0 : type;
        if (ne0 % ggml_type_info(type).block != 0) type = GGML_TYPE_F16;
    }
    return type;
}

static void quantize_file(const char* in_path, const char* out_path, const QuantTarget& target, bool pure,
                          bool requantize) {
    GGUFFile f;
    gguf_init_from_file(&f, in_path);
    struct Plan {
        const GGUFTensor* t;
        uint32_t type;
        uint64_t offset, n_bytes;
    };
    std::vector<Plan> plan;
    uint64_t off = 0;
    QuantMix mx;
    mx.n_layers = (int)gguf_get_int(&f, "llama.block_count", 0, false, 0, 1 << 20);
    int n_head = (int)gguf_get_int(&f, "llama.attention.head_count", 0, false, 0, 1 << 20);
    int n_head_kv = (int)gguf_get_int(&f, "llama.attention.head_count_kv", n_head, false, 0, 1 << 20);
    mx.is_70b = mx.n_layers == 80 && n_head != n_head_kv;
    for (const GGUFTensor& t : f.tensors) {
        if (t.name.find("attn_v.weight") != std::string::npos) mx.n_attn_v++;
        if (t.name == "output.weight") mx.tied = false;
    }
    for (const GGUFTensor& t : f.tensors) {
        // llama.cpp quantizes matrices named *weight, never the norms
        bool matrix = t.n_dims >= 2 && t.name.size() >= 6 && t.name.compare(t.name.size() - 6, 6, "weight") == 0 &&
                      t.name.find("_norm.weight") == std::string::npos;
        bool is_float = t.type == GGML_TYPE_F32 || t.type == GGML_TYPE_F16;
        uint32_t nt = t.type;
        if (matrix) {
            uint32_t want = quant_mix_type(&mx, t.name, t.ne[0], target, pure);
            if ((is_float || requantize) && want != t.type) nt = want;
        }
        TypeInfo ti = ggml_type_info(nt);
        uint64_t n_bytes = t.n_elements / ti.block * ti.block_size;
        plan.push_back({&t, nt, off, n_bytes});
        off += n_bytes;
        off += (f.alignment - off % f.alignment) % f.alignment;
    }
    uint32_t ftype = target.ftype;
    bool has_ftype = gguf_find(&f, "general.file_type") != nullptr;

    GGUFWriter w;  // an error below destroys it, which removes the temporary file
    gguf_writer_open(&w, out_path);
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
}
