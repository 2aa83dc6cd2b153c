// engine.h: a model with its tokenizer, threads, cache and the tokens the cache holds, and
// generate(), the sampling loop the run and chat commands stream from.
//
// engine_eval(ids) makes the cache hold exactly ids and returns the next-token logits; the prefix
// it already holds is not recomputed, so multi-turn chat and token-by-token generation cost one
// forward pass per new token.
#pragma once

#include <algorithm>
#include <string_view>
#include <thread>
#include <vector>

#include "common.h"
#include "forward.h"
#include "gguf.h"
#include "model.h"
#include "sampler.h"
#include "stream.h"
#include "threadpool.h"
#include "tokenizer.h"

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

// Samples up to n_new tokens after ids (which must fit the context); stops at an end-of-generation
// token (EOS, EOT, or one of end_ids: a chat template's end of turn such as <|im_end|>), a stop
// string, or a full context. Returns the generated ids.
static std::vector<int> generate(Engine* e, std::vector<int> ids, int n_new, Sampler* s, StreamPrinter* pr,
                                 bool ignore_eos, const std::vector<int>& end_ids = {}) {
    std::vector<int> out;
    const float* logits = engine_eval(e, ids);
    for (int i = 0; i < n_new; i++) {
        int tok = sampler_sample(s, logits, e->model.cfg.vocab_size, ids);
        bool end = tokenizer_is_eog(&e->tok, tok) || std::find(end_ids.begin(), end_ids.end(), tok) != end_ids.end();
        if (!ignore_eos && end) break;
        out.push_back(tok);
        ids.push_back(tok);
        if (pr && printer_add(pr, token_text(&e->tok, tok))) break;
        if (i + 1 == n_new || (int)ids.size() >= e->kv.n_ctx) break;
        logits = engine_eval(e, ids);
    }
    return out;
}
