// sampler.h: the next token from the logits: repetition penalty, temperature, top-k, top-p, in
// the order HF's generate applies them, drawn with a seeded xorshift64* generator (same seed,
// same tokens). temp 0 is greedy; the defaults are the project's generation defaults.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

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
