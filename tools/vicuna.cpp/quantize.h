// quantize.h: rewrite a GGUF with its 2-D F32/F16 tensors in a block type (vicuna quantize).
//
// Like llama.cpp, the classifier (output.weight, or token_embd.weight when the embeddings are
// tied) is kept at 8 bits when the target is a 4-bit type: its errors land directly on the
// logits. On SmolLM2-135M that is the difference between +12 % and +50 % perplexity for q4_0.
// `pure` quantizes it like everything else. `requantize` also converts tensors that are already
// quantized (through f32: the result carries the errors of both formats). Metadata is copied
// verbatim (general.file_type updated); the output is written under a temporary name and renamed
// into place (GGUFWriter).
#pragma once

#include <vector>

#include "common.h"
#include "gguf.h"
#include "quants.h"

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
