// perplexity.h: llama.cpp's perplexity of a model over a text (vicuna perplexity).
//
// The tokens are cut into chunks of n_ctx tokens; each chunk runs from an empty cache and only
// its second half is scored (those tokens see at least n_ctx/2 of context). Where the tokenizer
// adds BOS, it replaces each chunk's first token, so every chunk starts like a document.
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
};

// The first n_chunks chunks of e->kv.n_ctx tokens of `tokens` (the caller checks they are there).
// After each chunk the running estimate is printed to `progress` as "[k]ppl," (unless nullptr).
static Perplexity perplexity(Engine* e, const std::vector<int>& tokens, int n_chunks, FILE* progress) {
    const int n_ctx = e->kv.n_ctx, V = e->model.cfg.vocab_size, first = n_ctx / 2;
    if (n_ctx < 4 || n_chunks < 1 || tokens.size() < (size_t)n_chunks * n_ctx) {
        FAIL("%zu tokens do not make %d chunk(s) of a context of %d; use a longer text or a smaller -c",
             tokens.size(), n_chunks, n_ctx);
    }
    std::vector<float> logits((size_t)n_ctx * V);  // (n_ctx, vocab): every position's logits
    double nll = 0.0, nll2 = 0.0;
    long count = 0;
    for (int ch = 0; ch < n_chunks; ch++) {
        std::vector<int> chunk(tokens.begin() + (size_t)ch * n_ctx, tokens.begin() + (size_t)(ch + 1) * n_ctx);
        if (e->tok.add_bos) chunk[0] = e->tok.bos;
        engine_forward(e, chunk.data(), n_ctx, 0, logits.data(), true);
        for (int j = first; j < n_ctx - 1; j++) {  // position j predicts token j + 1
            const float* l = &logits[(size_t)j * V];
            float max = *std::max_element(l, l + V);
            double sum = 0.0;
            for (int v = 0; v < V; v++) sum += std::exp((double)l[v] - max);
            double lp = (double)l[chunk[j + 1]] - max - std::log(sum);
            nll -= lp;
            nll2 += lp * lp;
            count++;
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
    return r;
}
