// lora.h: a LoRA adapter GGUF attached to a loaded base model (vicuna ... --lora FILE).
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
//
// Two ways to apply it, chosen by speed (--lora-mode, default auto):
//   runtime  forward.h computes y = W x + scale * B (A x), scale = --lora-scale * alpha / rank
//            (llama.cpp's rule; per-module alphas and rsLoRA are folded into B by the exporter).
//            W stays what the file holds (mmap'ed; a 4-bit base stays 4-bit, no second rounding),
//            loading costs nothing, and A x runs inside the same thread-pool dispatch as W x.
//   merge    W' = W + scale * B A at load, row by row in W's own type (a Q4_1 row is dequantized,
//            updated and quantized back to Q4_1 with the reference quantizer), in owned memory;
//            then the model runs exactly as a merged file of that type does.
// Decode is bound by the bytes of weights a token reads (docs/performance.md: the embedded Q4_1
// model streams ~18 GB/s on one core), so run time costs about the adapter's share of those
// bytes: measured 0.97-0.99x the merged file's decode for r = 8 on q,v (1 % of the bytes) but
// 0.84-0.86x for r = 16 on every linear layer (10 %: A and B in F16 against a 0.6-byte Q4_1
// weight) on SmolLM2-135M. auto therefore merges when the adapter is over LORA_MERGE_ABOVE (5 %)
// of the bytes, which costs a fraction of a second at load (0.2 s for that adapter on one
// thread) and gives the merged file's speed;
// small adapters (and every adapter of a 7B model: r = 16 on all layers is 2 % of a Q4 file's
// bytes) stay at run time. The embedding's pair is always applied at run time (one row a token).
//
// A base/adapter mismatch (architecture, a tensor the base lacks, shapes) is one error line
// naming both files. --lora-scale 0 checks the adapter and attaches nothing: the base's logits.
#pragma once

#include <atomic>
#include <cinttypes>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "common.h"
#include "gguf.h"
#include "model.h"
#include "quants.h"
#include "threadpool.h"

static std::string lora_dims(const GGUFTensor* t) {
    std::string s = "[";
    for (uint32_t d = 0; d < t->n_dims; d++) s += (d ? ", " : "") + std::to_string(t->ne[d]);
    return s + "]";
}

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

// lw->a as F32/F16 (in place, or an F32 copy) and lw->bp, B in panels (see LoraWeight) from the
// file's B (rows, rank): F16 stays F16, anything else becomes F32.
static void lora_prepare(LoraWeight* lw, const Tensor& b, const char* adapter_path, uint64_t alignment) {
    Tensor& a = lw->a;
    if (a.type == GGML_TYPE_F32 || a.type == GGML_TYPE_F16) {
        if ((uintptr_t)a.data % (a.type == GGML_TYPE_F32 ? 4 : 2) != 0) {
            FAIL("--lora '%s': tensor '%s' data is not aligned (general.alignment = %" PRIu64 ")", adapter_path,
                 printable(a.name).c_str(), alignment);
        }
    } else {
        lw->a_f32.resize((size_t)(a.rows * a.cols));
        for (int64_t r = 0; r < a.rows; r++) {
            dequantize_row(a.type, a.data + (size_t)r * a.row_bytes, lw->a_f32.data() + (size_t)r * a.cols, a.cols);
        }
        a.type = GGML_TYPE_F32;
        a.data = (const uint8_t*)lw->a_f32.data();
        a.row_bytes = (size_t)a.cols * 4;
    }
    // B (rows, rank) -> panels of 8 rows, k-major; the last panel padded with zeros
    const int64_t rows = b.rows, rank = b.cols, padded = (rows + 7) / 8 * 8;
    auto at = [&](int64_t r, int64_t k) { return (size_t)((r / 8) * rank * 8 + k * 8 + r % 8); };
    Tensor& bp = lw->bp;
    bp.name = b.name;
    bp.rows = rank;
    bp.cols = rows;
    if (b.type == GGML_TYPE_F16) {
        lw->bp_f16.assign((size_t)(padded * rank), 0);
        for (int64_t r = 0; r < rows; r++) {
            for (int64_t k = 0; k < rank; k++) memcpy(&lw->bp_f16[at(r, k)], b.data + (size_t)r * b.row_bytes + 2 * k, 2);
        }
        bp.type = GGML_TYPE_F16;
        bp.data = (const uint8_t*)lw->bp_f16.data();
    } else {
        std::vector<float> row((size_t)rank);
        lw->bp_f32.assign((size_t)(padded * rank), 0.0f);
        for (int64_t r = 0; r < rows; r++) {
            dequantize_row(b.type, b.data + (size_t)r * b.row_bytes, row.data(), rank);
            for (int64_t k = 0; k < rank; k++) lw->bp_f32[at(r, k)] = row[k];
        }
        bp.type = GGML_TYPE_F32;
        bp.data = (const uint8_t*)lw->bp_f32.data();
    }
    bp.row_bytes = 0;  // not row-major: see LoraWeight
}

// B[r, k] from the panels
static float lora_load_panel(const LoraWeight* L, int64_t r, int64_t k) {
    size_t i = (size_t)((r / 8) * L->rank * 8 + k * 8 + r % 8);
    return L->bp.type == GGML_TYPE_F32 ? L->bp_f32[i] : fp16_to_fp32(L->bp_f16[i]);
}

// Every value of B finite (in its panels; the padding is zeros).
static bool lora_finite_panels(const LoraWeight& lw) {
    if (lw.bp.type == GGML_TYPE_F32) {
        for (float v : lw.bp_f32) {
            if (!std::isfinite(v)) return false;
        }
    } else {
        for (uint16_t h : lw.bp_f16) {
            if (!std::isfinite(fp16_to_fp32(h))) return false;
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

// ----------------------------------------------------------------------------
// merging at load: W' = W + scale * B A, row by row, requantized to W's own type

enum LoraMode { LORA_AUTO, LORA_RUNTIME, LORA_MERGE };

// Above this share of the bytes a token reads, LORA_AUTO merges (see the top of this file).
static const double LORA_MERGE_ABOVE = 0.05;

struct LoraMergeTask {
    const Tensor* w;
    const LoraWeight* L;
    const float* a;  // A as F32 (rank, cols)
    uint8_t* dst;    // rows * w->row_bytes
    std::atomic<int64_t> next{0};
};

static void lora_merge_worker(void* p, int, int) {
    LoraMergeTask* t = (LoraMergeTask*)p;
    const Tensor* w = t->w;
    const LoraWeight* L = t->L;
    const int64_t cols = w->cols, rank = L->rank;
    std::vector<float> row((size_t)cols);
    for (;;) {
        int64_t r0 = t->next.fetch_add(16, std::memory_order_relaxed);
        if (r0 >= w->rows) break;
        for (int64_t r = r0; r < std::min(w->rows, r0 + 16); r++) {
            dequantize_row(w->type, w->data + (size_t)r * w->row_bytes, row.data(), cols);
            for (int64_t k = 0; k < rank; k++) {
                float c = L->scale * lora_load_panel(L, r, k);
                const float* ak = t->a + (size_t)k * cols;
                for (int64_t i = 0; i < cols; i++) row[i] += c * ak[i];
            }
            quantize_row(w->type, row.data(), t->dst + (size_t)r * w->row_bytes, cols);
        }
    }
}

// Replaces *w's data by W + scale B A in W's type (an owned copy; the file is not touched).
static void lora_merge_into(Tensor* w, const LoraWeight* L, Adapter* ad, ThreadPool* pool) {
    std::vector<float> a((size_t)(L->rank * w->cols));
    for (int64_t k = 0; k < L->rank; k++) dequantize_row(L->a.type, L->a.data + (size_t)k * L->a.row_bytes, a.data() + (size_t)k * w->cols, w->cols);
    ad->merged_data.emplace_back((size_t)w->rows * w->row_bytes);
    LoraMergeTask t;
    t.w = w;
    t.L = L;
    t.a = a.data();
    t.dst = ad->merged_data.back().data();
    pool_run(pool, lora_merge_worker, &t);
    w->data = t.dst;
}

// The bytes of weights one decoded token reads (every matrix but the embedding, read a row a token).
static double lora_base_bytes(const Model* m) {
    double n = (double)m->output.rows * m->output.row_bytes;
    for (const LayerWeights& l : m->layers) {
        for (const Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) n += (double)t->rows * t->row_bytes;
    }
    return n;
}

// Reads the adapter at `path`, checks it against the model's weights and attaches it with the
// given scale (0: checked, not attached): at run time, or merged into the weights at load (mode;
// LORA_AUTO merges when the adapter is more than LORA_MERGE_ABOVE of the bytes a token reads).
// Returns a line saying which, for -v.
static std::string lora_attach(Model* m, const char* path, float scale, LoraMode mode = LORA_RUNTIME,
                               ThreadPool* pool = nullptr) {
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
        lw.a = embd ? tensor_view(ta, w->rows, rank) : tensor_view(ta, rank, w->cols);
        Tensor b = embd ? tensor_view(tb, w->cols, rank) : tensor_view(tb, w->rows, rank);
        lora_prepare(&lw, b, A, f->alignment);
        if (!lora_finite(lw.a) || !lora_finite_panels(lw)) {
            FAIL("--lora '%s': tensor '%s' holds NaN or infinite values; the training run that wrote the adapter "
                 "diverged: retrain it with a lower --learning_rate", A,
                 printable(lora_finite(lw.a) ? tb->name : ta->name).c_str());
        }
        ad.weights.push_back(std::move(lw));
        adapted.push_back(w);
    }
    char line[512];
    if (scale == 0.0f) {  // checked, not applied: exactly the base model
        snprintf(line, sizeof line, "lora: '%s' checked, not applied (--lora-scale 0)", A);
        return line;
    }
    // what the adapter adds to each token's reads at run time: A and B of every pair but the embedding's
    double lora_bytes = 0;
    for (size_t i = 0; i < adapted.size(); i++) {
        const LoraWeight& lw = ad.weights[i];
        if (adapted[i] == &m->token_embd) continue;
        size_t es_a = lw.a.type == GGML_TYPE_F16 ? 2 : 4, es_b = lw.bp.type == GGML_TYPE_F16 ? 2 : 4;
        lora_bytes += (double)lw.rank * (double)(lw.a.cols * es_a + lw.bp.cols * es_b);
    }
    double share = lora_bytes / lora_base_bytes(m);
    ad.merged = mode == LORA_MERGE || (mode == LORA_AUTO && share > LORA_MERGE_ABOVE);
    if (ad.merged && !pool) FAIL("internal: merging a LoRA adapter needs the thread pool");
    int n_merged = 0;
    ad.merged_data.reserve(adapted.size());
    for (size_t i = 0; i < adapted.size(); i++) {
        // the embedding is one row a token, and Q2_K/Q3_K have no quantizer here: always at run time
        if (ad.merged && adapted[i] != &m->token_embd && can_quantize_row(adapted[i]->type)) {
            LoraWeight& lw = ad.weights[i];
            lora_merge_into(adapted[i], &lw, &ad, pool);
            std::vector<float>().swap(lw.a_f32);  // A and B are in the weights now
            std::vector<float>().swap(lw.bp_f32);
            std::vector<uint16_t>().swap(lw.bp_f16);
            lw.a.data = lw.bp.data = nullptr;
            n_merged++;
        } else {
            adapted[i]->lora = &ad.weights[i];
        }
    }
    snprintf(line, sizeof line, "lora: '%s': %zu pairs, %.1f%% of the bytes a token reads; %d merged into the "
             "weights at load, %zu applied at run time", A, adapted.size(), 100.0 * share, n_merged,
             adapted.size() - (size_t)n_merged);
    return line;
}
