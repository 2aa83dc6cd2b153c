// lora.h: a LoRA adapter GGUF attached to a loaded model at run time (vicuna ... --lora FILE).
//
// The adapter file is llama.cpp's format (what tools/convert_gguf.py --lora_path and llama.cpp's
// convert_lora_to_gguf.py write):
//   general.type = "adapter", adapter.type = "lora", general.architecture = the base's,
//   adapter.lora.alpha (f32; 0 or absent: no alpha / rank factor),
//   for every adapted base weight W named N (rows, cols):
//     N.lora_a   ne [cols, rank]   A
//     N.lora_b   ne [rank, rows]   B, rows of attn_q / attn_k permuted like the base's
//   and on token_embd.weight (an embedding, flipped as llama.cpp stores it):
//     lora_a ne [rank, vocab], lora_b ne [rank, dim].
// forward.h then computes y = W x + scale * B (A x) with scale = --lora-scale * alpha / rank,
// llama.cpp's rule (per-module alphas, rsLoRA and the like are folded into B by the exporter).
//
// Why at run time and not merged into W at load: W stays what the file holds (mmap'ed, shared, a
// 4-bit base stays 4-bit with no second rounding of W + BA), loading costs nothing, and the extra
// work per token is r * (rows + cols) multiply-adds per adapted weight, done inside the same
// thread-pool dispatch as W (forward.h's matmul): measured in docs/performance.md, within a few
// per cent of a merged file's decode speed for r = 16 on every linear layer.
//
// A base/adapter mismatch (architecture, a tensor the base lacks, shapes) is one error line
// naming both files. --lora-scale 0 checks the adapter and attaches nothing: the base's logits.
#pragma once

#include <cinttypes>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "common.h"
#include "gguf.h"
#include "model.h"
#include "quants.h"

static std::string lora_dims(const GGUFTensor* t) {
    std::string s = "[";
    for (uint32_t d = 0; d < t->n_dims; d++) s += (d ? ", " : "") + std::to_string(t->ne[d]);
    return s + "]";
}

// A (rows, cols) view of an adapter tensor; Q8_0/Q4 data is dequantized to F32 into `owned`
// (at offset `at`, filled by the caller's second pass), F32/F16 points into the mapped file.
static Tensor lora_view(const GGUFTensor* t, int64_t rows, int64_t cols) {
    Tensor v;
    v.name = t->name;
    v.type = t->type;
    v.rows = rows;
    v.cols = cols;
    v.row_bytes = (size_t)(t->n_bytes / (uint64_t)rows);
    v.data = t->data;
    return v;
}

static bool lora_in_place(uint32_t type) { return type == GGML_TYPE_F32 || type == GGML_TYPE_F16; }

// Every value of a (rows, cols) tensor finite; a diverged training run leaves NaN in an adapter.
static bool lora_finite(const Tensor& t) {
    std::vector<float> row((size_t)t.cols);
    for (int64_t r = 0; r < t.rows; r++) {
        dequantize_row(t.type, t.data + (size_t)r * t.row_bytes, row.data(), t.cols);
        for (float v : row) {
            if (!std::isfinite(v)) return false;
        }
    }
    return true;
}

// The base weights an adapter may target, by GGUF name.
static std::map<std::string, Tensor*> lora_targets(Model* m) {
    std::map<std::string, Tensor*> t;
    t["token_embd.weight"] = &m->token_embd;
    if (gguf_find_tensor(&m->file, "output.weight")) t["output.weight"] = &m->output;  // tied: no output.weight
    for (int l = 0; l < m->cfg.n_layers; l++) {
        LayerWeights& w = m->layers[l];
        std::string p = "blk." + std::to_string(l) + ".";
        t[p + "attn_q.weight"] = &w.wq;
        t[p + "attn_k.weight"] = &w.wk;
        t[p + "attn_v.weight"] = &w.wv;
        t[p + "attn_output.weight"] = &w.wo;
        t[p + "ffn_gate.weight"] = &w.w_gate;
        t[p + "ffn_up.weight"] = &w.w_up;
        t[p + "ffn_down.weight"] = &w.w_down;
    }
    return t;
}

// Reads the adapter at `path`, checks it against the model's weights and attaches it with the
// given scale (0: checked, not attached).
static void lora_attach(Model* m, const char* path, float scale) {
    Adapter& ad = m->adapter;
    if (!ad.file.path.empty()) FAIL("one --lora adapter at a time ('%s' is attached)", printable(ad.file.path).c_str());
    if (!std::isfinite(scale)) FAIL("--lora-scale must be a finite number");
    gguf_init_from_file(&ad.file, path);
    const GGUFFile* f = &ad.file;
    const std::string ap = printable(path), mp = printable(m->file.path);
    const char* A = ap.c_str();
    const char* M = mp.c_str();

    std::string_view type = gguf_get_str(f, "general.type", false);
    if (type != "adapter") {
        FAIL("--lora '%s' is not a LoRA adapter (general.type is '%s'); pass an adapter GGUF "
             "(tools/convert_gguf.py --lora_path ADAPTER) and the base model with -m ('%s')",
             A, type.empty() ? "absent" : printable(type).c_str(), M);
    }
    std::string_view kind = gguf_get_str(f, "adapter.type", false);
    if (kind != "lora") {
        FAIL("--lora '%s' is a '%s' adapter, not a LoRA (adapter.type must be 'lora'); model '%s'", A,
             printable(kind).c_str(), M);
    }
    std::string_view arch = gguf_get_str(f, "general.architecture", false);
    std::string_view base_arch = gguf_get_str(&m->file, "general.architecture", true);
    if (arch != base_arch) {
        FAIL("adapter '%s' does not fit model '%s': the adapter is for architecture '%s', the model is '%s'; "
             "pass the base model the adapter was trained on", A, M, printable(arch).c_str(),
             printable(base_arch).c_str());
    }
    double alpha = gguf_get_float(f, "adapter.lora.alpha", 0.0);
    if (!std::isfinite(alpha)) FAIL("--lora '%s': adapter.lora.alpha is %g, not a finite number", A, alpha);
    ad.alpha = (float)alpha;
    ad.scale = scale;
    ad.prompt_type = std::string(gguf_get_str(f, "vicuna.prompt_type", false));

    // pair N.lora_a with N.lora_b
    std::map<std::string, std::pair<const GGUFTensor*, const GGUFTensor*>> pairs;
    auto ends_with = [](std::string_view s, std::string_view suffix) {
        return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
    };
    for (const GGUFTensor& t : f->tensors) {
        if (ends_with(t.name, ".lora_a")) {
            pairs[std::string(t.name.substr(0, t.name.size() - 7))].first = &t;
        } else if (ends_with(t.name, ".lora_b")) {
            pairs[std::string(t.name.substr(0, t.name.size() - 7))].second = &t;
        } else if (ends_with(t.name, "_norm.weight")) {
            // llama.cpp skips these too (mergekit-extract-lora writes them); say so
            fprintf(stderr, "vicuna: note: --lora '%s': tensor '%s' is not a LoRA pair and is ignored\n", A,
                    printable(t.name).c_str());
        } else {
            FAIL("--lora '%s': tensor '%s' is neither a .lora_a nor a .lora_b tensor; the file is not a LoRA "
                 "adapter vicuna can apply", A, printable(t.name).c_str());
        }
    }
    if (pairs.empty()) FAIL("--lora '%s' holds no LoRA tensors (name.lora_a / name.lora_b)", A);

    std::map<std::string, Tensor*> targets = lora_targets(m);
    ad.weights.reserve(pairs.size());  // never reallocated afterwards: Tensor::lora points into it
    std::vector<Tensor*> adapted;
    for (auto& [name, ab] : pairs) {
        const GGUFTensor* ta = ab.first;
        const GGUFTensor* tb = ab.second;
        if (!ta || !tb) {
            FAIL("--lora '%s': '%s' has %s but no %s; the adapter file is incomplete", A, printable(name).c_str(),
                 ta ? "lora_a" : "lora_b", ta ? "lora_b" : "lora_a");
        }
        auto it = targets.find(name);
        if (it == targets.end()) {
            FAIL("adapter '%s' does not fit model '%s': the model has no weight '%s' for the adapter's '%s'; "
                 "pass the base model the adapter was trained on", A, M, printable(name).c_str(),
                 printable(ta->name).c_str());
        }
        Tensor* w = it->second;
        bool embd = name == "token_embd.weight";
        // linear: A [cols, r] and B [r, rows]; token_embd: A [r, vocab] and B [r, dim]
        uint64_t want_a0 = embd ? tb->ne[0] : (uint64_t)w->cols, want_a1 = embd ? (uint64_t)w->rows : ta->ne[1];
        uint64_t want_b0 = embd ? ta->ne[0] : ta->ne[1], want_b1 = embd ? (uint64_t)w->cols : (uint64_t)w->rows;
        if (ta->n_dims != 2 || tb->n_dims != 2 || ta->ne[0] != want_a0 || ta->ne[1] != want_a1 ||
            tb->ne[0] != want_b0 || tb->ne[1] != want_b1) {
            FAIL("adapter '%s' does not fit model '%s': '%s' is [%" PRId64 ", %" PRId64 "] in the model but the "
                 "adapter's lora_a %s and lora_b %s do not make that shape; pass the base model the adapter was "
                 "trained on", A, M, printable(name).c_str(), w->cols, w->rows,
                 lora_dims(ta).c_str(), lora_dims(tb).c_str());
        }
        int64_t rank = (int64_t)(embd ? ta->ne[0] : ta->ne[1]);
        if (rank > (1 << 16)) FAIL("--lora '%s': '%s' has rank %" PRId64 ", more than 65536", A, printable(name).c_str(), rank);
        LoraWeight lw;
        lw.rank = (int)rank;
        lw.scale = scale * (alpha != 0.0 ? (float)(alpha / (double)rank) : 1.0f);
        lw.a = embd ? lora_view(ta, w->rows, rank) : lora_view(ta, rank, w->cols);
        lw.b = embd ? lora_view(tb, w->cols, rank) : lora_view(tb, w->rows, rank);
        ad.weights.push_back(std::move(lw));
        adapted.push_back(w);
    }

    // F32/F16 stay in the mapping (aligned as the format promises); other types become F32 copies
    for (LoraWeight& lw : ad.weights) {
        size_t n = 0;
        for (Tensor* t : {&lw.a, &lw.b}) {
            if (!lora_in_place(t->type)) n += (size_t)(t->rows * t->cols);
        }
        lw.owned.resize(n);
        size_t at = 0;
        for (Tensor* t : {&lw.a, &lw.b}) {
            if (lora_in_place(t->type)) {
                if ((uintptr_t)t->data % (t->type == GGML_TYPE_F32 ? 4 : 2) != 0) {
                    FAIL("--lora '%s': tensor '%s' data is not aligned (general.alignment = %" PRIu64 ")", A,
                         printable(t->name).c_str(), f->alignment);
                }
                continue;
            }
            float* dst = lw.owned.data() + at;
            for (int64_t r = 0; r < t->rows; r++) {
                dequantize_row(t->type, t->data + (size_t)r * t->row_bytes, dst + (size_t)r * t->cols, t->cols);
            }
            t->type = GGML_TYPE_F32;
            t->data = (const uint8_t*)dst;
            t->row_bytes = (size_t)t->cols * 4;
            at += (size_t)(t->rows * t->cols);
        }
        for (Tensor* t : {&lw.a, &lw.b}) {
            if (!lora_finite(*t)) {
                FAIL("--lora '%s': tensor '%s' holds NaN or infinite values; the training run that wrote the "
                     "adapter diverged: retrain it with a lower --learning_rate", A, printable(t->name).c_str());
            }
        }
    }
    if (scale == 0.0f) return;  // checked, not applied: exactly the base model
    for (size_t i = 0; i < adapted.size(); i++) adapted[i]->lora = &ad.weights[i];
}
