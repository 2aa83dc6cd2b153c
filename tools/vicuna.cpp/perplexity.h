// perplexity.h: llama.cpp's perplexity of a model over a text (vicuna perplexity).
//
// The tokens are cut into chunks of n_ctx tokens; each chunk runs from an empty cache and only
// its second half is scored (those tokens see at least n_ctx/2 of context). Where the tokenizer
// adds BOS, it replaces each chunk's first token, so every chunk starts like a document.
//
// With a reference model (--ref: the same model in a more exact type, e.g. f32 against q4_k_m),
// both run on the same token ids and each scored position also gives the KL divergence of the
// model's next-token distribution from the reference's and whether their top tokens agree:
// llama.cpp's --kl-divergence statistics. These measure what quantization does to the model far
// more steadily than the perplexity ratio, which moves by a few tenths of a percent when a single
// rounding of an activation flips (see docs/performance.md, "Quantized accuracy").
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "engine.h"

struct Perplexity {
    double ppl = 0.0;    // exp(mean negative log-likelihood per scored token)
    double err = 0.0;    // its standard error, exp(mean) * stderr(nll), as llama.cpp reports it
    long n_scored = 0;   // tokens scored
    // against a reference model (ref != nullptr), over the same positions
    double ref_ppl = 0.0;   // the reference's perplexity
    double kl_mean = 0.0;   // mean KL(reference || model) in nats
    double kl_p99 = 0.0;    // its 99th percentile
    double top1 = 0.0;      // share of positions where both models' most likely token is the same
};

// log-softmax of n logits into out (double), returning the argmax
static int log_softmax(const float* l, int n, double* out) {
    int best = (int)(std::max_element(l, l + n) - l);
    double max = l[best], sum = 0.0;
    for (int v = 0; v < n; v++) sum += std::exp((double)l[v] - max);
    double lse = max + std::log(sum);
    for (int v = 0; v < n; v++) out[v] = (double)l[v] - lse;
    return best;
}

// The first n_chunks chunks of e->kv.n_ctx tokens of `tokens` (the caller checks they are there).
// After each chunk the running estimate is printed to `progress` as "[k]ppl," (unless nullptr).
// `ref` (or nullptr): a reference engine with the same vocabulary and context, run on the same ids.
static Perplexity perplexity(Engine* e, const std::vector<int>& tokens, int n_chunks, FILE* progress,
                             Engine* ref = nullptr) {
    const int n_ctx = e->kv.n_ctx, V = e->model.cfg.vocab_size, first = n_ctx / 2;
    if (n_ctx < 4 || n_chunks < 1 || tokens.size() < (size_t)n_chunks * n_ctx) {
        FAIL("%zu tokens do not make %d chunk(s) of a context of %d; use a longer text or a smaller -c",
             tokens.size(), n_chunks, n_ctx);
    }
    if (ref && (ref->kv.n_ctx != n_ctx || ref->model.cfg.vocab_size != V)) {
        FAIL("the reference model has %d tokens of context and a vocabulary of %d, this one %d and %d",
             ref->kv.n_ctx, ref->model.cfg.vocab_size, n_ctx, V);
    }
    std::vector<float> logits((size_t)n_ctx * V), ref_logits(ref ? (size_t)n_ctx * V : 0);
    std::vector<double> lp(V), ref_lp(ref ? V : 0), kls;
    double nll = 0.0, nll2 = 0.0, ref_nll = 0.0;
    long count = 0, same_top = 0;
    for (int ch = 0; ch < n_chunks; ch++) {
        std::vector<int> chunk(tokens.begin() + (size_t)ch * n_ctx, tokens.begin() + (size_t)(ch + 1) * n_ctx);
        if (e->tok.add_bos) chunk[0] = e->tok.bos;
        engine_forward(e, chunk.data(), n_ctx, 0, logits.data(), true);
        if (ref) engine_forward(ref, chunk.data(), n_ctx, 0, ref_logits.data(), true);
        for (int j = first; j < n_ctx - 1; j++) {  // position j predicts token j + 1
            int top = log_softmax(&logits[(size_t)j * V], V, lp.data());
            double l = lp[chunk[j + 1]];
            nll -= l;
            nll2 += l * l;
            count++;
            if (!ref) continue;
            int ref_top = log_softmax(&ref_logits[(size_t)j * V], V, ref_lp.data());
            ref_nll -= ref_lp[chunk[j + 1]];
            double kl = 0.0;
            for (int v = 0; v < V; v++) kl += std::exp(ref_lp[v]) * (ref_lp[v] - lp[v]);
            kls.push_back(std::max(0.0, kl));
            same_top += top == ref_top;
        }
        if (progress) {
            fprintf(progress, "[%d]%.4f,", ch + 1, std::exp(nll / count));
            fflush(progress);
        }
    }
    Perplexity r;
    double mean = nll / count, var = nll2 / count - mean * mean;
    r.ppl = std::exp(mean);
    r.err = count > 1 ? r.ppl * std::sqrt(std::max(0.0, var) / (count - 1)) : 0.0;
    r.n_scored = count;
    if (ref) {
        r.ref_ppl = std::exp(ref_nll / count);
        for (double k : kls) r.kl_mean += k;
        r.kl_mean /= (double)kls.size();
        size_t i99 = (size_t)(0.99 * (double)(kls.size() - 1));
        std::nth_element(kls.begin(), kls.begin() + (long)i99, kls.end());
        r.kl_p99 = kls[i99];
        r.top1 = (double)same_top / (double)count;
    }
    return r;
}
