// test.cpp: the engine's own tests. It includes cli.h (and through it every header of the
// engine) and tests the pieces directly; tests/test_vicuna_cpp.py builds it with ASan/UBSan
// and runs:
//
//   vicuna-test unit                       fp16, quantizer error budgets, kernels vs scalar
//                                          references, pre-tokenizer, stop strings, sampler, pool
//   vicuna-test fuzz SEED.gguf N SEED SECS mutate SEED.gguf N times (or for SECS seconds) and
//                                          run reader, tokenizer, model and a forward pass on each
//   vicuna-test cli ARGS...                the vicuna CLI itself (same exit codes and messages)
//
// Golden values from Python (gguf-py's quantizers, HF tokenizer ids, transformers logits) are
// checked in tests/test_vicuna_cpp.py through the CLI.
#include "cli.h"

#include <random>

static int g_failures = 0;

#define CHECK(cond, ...)                                            \
    do {                                                            \
        if (!(cond)) {                                              \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);    \
            fprintf(stderr, __VA_ARGS__);                           \
            fprintf(stderr, "\n");                                  \
            g_failures++;                                           \
        }                                                           \
    } while (0)

// ----------------------------------------------------------------------------
// error budgets
//
// Round trip: rms(x - dequantize(quantize(x))) / rms(x) on seeded N(0, 1) data, so there is
// no noise. Measured: F16 0.00021, Q8_0 0.0053, Q4_1 0.078, Q4_0 0.086 (the 4-bit types spend
// one of 16 levels on the sign or the minimum), Q6_K 0.0177, Q5_K 0.0360, Q5_1 0.0378, Q5_0 0.0425,
// Q4_K 0.0711 (the K-quants' searched scales beat the 32-block types of the same bits). The budgets leave 15-50 % headroom: they are
// broken by a real bug (wrong rounding, wrong nibble order), not by a harmless change.
static const double MAX_ROUNDTRIP_ERR_F16 = 0.0005;
static const double MAX_ROUNDTRIP_ERR_Q8_0 = 0.008;
static const double MAX_ROUNDTRIP_ERR_Q4_1 = 0.09;
static const double MAX_ROUNDTRIP_ERR_Q4_0 = 0.10;
static const double MAX_ROUNDTRIP_ERR_Q6_K = 0.025;
static const double MAX_ROUNDTRIP_ERR_Q5_K = 0.045;
static const double MAX_ROUNDTRIP_ERR_Q5_1 = 0.045;
static const double MAX_ROUNDTRIP_ERR_Q5_0 = 0.05;
static const double MAX_ROUNDTRIP_ERR_Q4_K = 0.085;
// Kernels against an exact (double) dot of the same dequantized operands, relative to
// ||w|| ||x||: only float summation order differs.
static const double MAX_KERNEL_ERR = 1e-5;
// Quantized dot (int8 activations) against the exact float dot of the original weights and
// activations, relative to ||w|| ||x||: the quantization error of both operands. Measured for the
// newer types: Q6_K 0.0024, Q5_K 0.0039, Q5_1 0.0046, Q5_0 0.0044, Q4_K 0.0073.
static const double MAX_DOT_ERR_Q8_0 = 0.004;
static const double MAX_DOT_ERR_Q4_1 = 0.03;
static const double MAX_DOT_ERR_Q4_0 = 0.035;
static const double MAX_DOT_ERR_Q6_K = 0.005;
static const double MAX_DOT_ERR_Q5_K = 0.008;
static const double MAX_DOT_ERR_Q5_1 = 0.009;
static const double MAX_DOT_ERR_Q5_0 = 0.009;
static const double MAX_DOT_ERR_Q4_K = 0.015;

static std::vector<float> randn(size_t n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng);
    return v;
}

// The larger error, NaN as soon as either is NaN: std::max(w, NaN) returns w (NaN compares
// false), so a kernel returning NaN would pass every `worst <= budget` check.
static double worst_of(double worst, double err) {
    return std::isnan(worst) || std::isnan(err) ? NAN : std::max(worst, err);
}

static size_t row_size(uint32_t type, int64_t n) {
    TypeInfo ti = ggml_type_info(type);
    return (size_t)(n / ti.block * ti.block_size);
}

// ----------------------------------------------------------------------------
// unit tests

static void test_fp16() {
    for (uint32_t h = 0; h < 65536; h++) {
        float a = fp16_to_fp32_ref((uint16_t)h), b = fp16_to_fp32((uint16_t)h);
        uint32_t ba, bb;
        memcpy(&ba, &a, 4);
        memcpy(&bb, &b, 4);
        bool nan = std::isnan(a) && std::isnan(b);
        CHECK(nan || ba == bb, "fp16_to_fp32(0x%04x): ref %08x, fast %08x", h, ba, bb);
        if (!std::isnan(a)) CHECK(fp32_to_fp16_ref(a) == h, "fp32_to_fp16_ref(fp16 0x%04x) does not round trip", h);
    }
    std::mt19937 rng(1);
    for (int i = 0; i < 1000000; i++) {
        uint32_t bits = rng();
        float f;
        memcpy(&f, &bits, 4);
        if (std::isnan(f)) continue;
        uint16_t a = fp32_to_fp16_ref(f), b = fp32_to_fp16(f);
        CHECK(a == b, "fp32_to_fp16(%g): ref 0x%04x, fast 0x%04x", f, a, b);
        if (a != b) break;
    }
}

static double roundtrip_error(uint32_t type, const std::vector<float>& x) {
    std::vector<uint8_t> q(row_size(type, (int64_t)x.size()));
    std::vector<float> y(x.size());
    quantize_row(type, x.data(), q.data(), (int64_t)x.size());
    dequantize_row(type, q.data(), y.data(), (int64_t)x.size());
    double err = 0, ref = 0;
    for (size_t i = 0; i < x.size(); i++) {
        err += (x[i] - y[i]) * (double)(x[i] - y[i]);
        ref += x[i] * (double)x[i];
    }
    return std::sqrt(err / ref);
}

static void test_quant_roundtrip() {
    std::vector<float> x = randn(32 * 4096, 7);
    struct {
        uint32_t type;
        double budget;
    } cases[] = {{GGML_TYPE_F16, MAX_ROUNDTRIP_ERR_F16},
                 {GGML_TYPE_Q8_0, MAX_ROUNDTRIP_ERR_Q8_0},
                 {GGML_TYPE_Q4_1, MAX_ROUNDTRIP_ERR_Q4_1},
                 {GGML_TYPE_Q4_0, MAX_ROUNDTRIP_ERR_Q4_0},
                 {GGML_TYPE_Q6_K, MAX_ROUNDTRIP_ERR_Q6_K},
                 {GGML_TYPE_Q5_K, MAX_ROUNDTRIP_ERR_Q5_K},
                 {GGML_TYPE_Q5_1, MAX_ROUNDTRIP_ERR_Q5_1},
                 {GGML_TYPE_Q5_0, MAX_ROUNDTRIP_ERR_Q5_0},
                 {GGML_TYPE_Q4_K, MAX_ROUNDTRIP_ERR_Q4_K}};
    for (auto& c : cases) {
        double e = roundtrip_error(c.type, x);
        printf("roundtrip %-5s rms error %.5f (budget %.5f)\n", ggml_type_info(c.type).name, e, c.budget);
        CHECK(e <= c.budget, "%s round trip error %.5f exceeds %.5f", ggml_type_info(c.type).name, e, c.budget);
    }
    // edge cases: all zeros, constant blocks, one huge value
    std::vector<float> z(256, 0.0f), k(256, 3.5f);
    for (uint32_t t : {GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q4_K,
                       GGML_TYPE_Q5_K, GGML_TYPE_Q6_K}) {
        CHECK(roundtrip_error(t, k) < 1e-2, "%s: a constant block does not survive", ggml_type_info(t).name);
        std::vector<uint8_t> q(row_size(t, 256));
        std::vector<float> y(256, 1.0f);
        quantize_row(t, z.data(), q.data(), 256);
        dequantize_row(t, q.data(), y.data(), 256);
        for (float v : y) CHECK(v == 0.0f, "%s: zeros do not stay zero", ggml_type_info(t).name);
    }
}

static double dot_exact(const float* a, const float* b, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

static void test_kernels() {
    const int cols = 512, rows = 8, B = 7;  // B = 7: one pass of 4 columns plus three single ones
    std::vector<float> w = randn((size_t)rows * cols, 11), x = randn((size_t)B * cols, 12);
    std::vector<BlockQ8A> xq((size_t)B * cols / QK), xq_ref((size_t)B * cols / QK);
    quantize_act(x.data(), xq.data(), (int64_t)B * cols);
    quantize_act_ref(x.data(), xq_ref.data(), (int64_t)B * cols);
    CHECK(memcmp(xq.data(), xq_ref.data(), xq.size() * sizeof(BlockQ8A)) == 0,
          "quantize_act differs from quantize_act_ref");
    std::vector<float> xdq((size_t)B * cols);  // the activations as the int8 kernels see them
    for (size_t i = 0; i < xq.size(); i++)
        for (int j = 0; j < QK; j++) xdq[i * QK + j] = xq[i].d * xq[i].qs[j];
    // the K-quants' activation blocks (one scale per 256, sums of 16)
    std::vector<BlockQ8K> xqk((size_t)B * cols / QK_K), xqk_ref((size_t)B * cols / QK_K);
    quantize_act_k(x.data(), xqk.data(), (int64_t)B * cols);
    quantize_act_k_ref(x.data(), xqk_ref.data(), (int64_t)B * cols);
    CHECK(memcmp(xqk.data(), xqk_ref.data(), xqk.size() * sizeof(BlockQ8K)) == 0,
          "quantize_act_k differs from quantize_act_k_ref");
    std::vector<float> xdqk((size_t)B * cols);
    for (size_t i = 0; i < xqk.size(); i++) {
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int j = 16 * g; j < 16 * g + 16; j++) sum += xqk[i].qs[j];
            CHECK(sum == xqk[i].bsums[g], "quantize_act_k: bsums[%d] = %d, the quants sum to %d", g, xqk[i].bsums[g], sum);
        }
        for (int j = 0; j < QK_K; j++) xdqk[i * QK_K + j] = xqk[i].d * xqk[i].qs[j];
    }

    struct {
        uint32_t type;
        double budget;
    } cases[] = {{GGML_TYPE_F32, 1e-6}, {GGML_TYPE_F16, 2e-3}, {GGML_TYPE_Q8_0, MAX_DOT_ERR_Q8_0},
                 {GGML_TYPE_Q4_1, MAX_DOT_ERR_Q4_1}, {GGML_TYPE_Q4_0, MAX_DOT_ERR_Q4_0},
                 {GGML_TYPE_Q6_K, MAX_DOT_ERR_Q6_K}, {GGML_TYPE_Q5_K, MAX_DOT_ERR_Q5_K},
                 {GGML_TYPE_Q5_1, MAX_DOT_ERR_Q5_1}, {GGML_TYPE_Q5_0, MAX_DOT_ERR_Q5_0},
                 {GGML_TYPE_Q4_K, MAX_DOT_ERR_Q4_K}};
    for (auto& c : cases) {
        size_t rb = row_size(c.type, cols);
        std::vector<uint8_t> wq(rb * rows);
        std::vector<float> wdq((size_t)rows * cols);
        for (int r = 0; r < rows; r++) {
            quantize_row(c.type, &w[(size_t)r * cols], &wq[r * rb], cols);
            dequantize_row(c.type, &wq[r * rb], &wdq[(size_t)r * cols], cols);
        }
        bool qt = c.type != GGML_TYPE_F32 && c.type != GGML_TYPE_F16;
        double worst_kernel = 0, worst_quant = 0;
        for (int r = 0; r < rows; r++) {
            float o4[4], o1 = 0.0f, oref = 0.0f;
            for (int b = 0; b < B; b++) {
                dot_row<1>(c.type, &wq[r * rb], x.data(), xq.data(), xqk.data(), b, cols, &o1);
                dot_row_ref<1>(c.type, &wq[r * rb], x.data(), xq.data(), xqk.data(), b, cols, &oref);
                CHECK(std::fabs(o1 - oref) <= 1e-5f * (1.0f + std::fabs(oref)), "%s: SIMD kernel %g, portable %g",
                      ggml_type_info(c.type).name, o1, oref);
                if (b + 4 <= B && b % 4 == 0) {
                    dot_row<4>(c.type, &wq[r * rb], x.data(), xq.data(), xqk.data(), b, cols, o4);
                    for (int k = 0; k < 4; k++) {
                        float ok = 0.0f;
                        dot_row<1>(c.type, &wq[r * rb], x.data(), xq.data(), xqk.data(), b + k, cols, &ok);
                        CHECK(o4[k] == ok, "%s: 4-column kernel %g differs from 1-column %g",
                              ggml_type_info(c.type).name, o4[k], ok);
                    }
                }
                bool kq = c.type == GGML_TYPE_Q4_K || c.type == GGML_TYPE_Q5_K || c.type == GGML_TYPE_Q6_K;
                const float* xs = &(kq ? xdqk : qt ? xdq : x)[(size_t)b * cols];
                double norm = std::sqrt(dot_exact(&wdq[(size_t)r * cols], &wdq[(size_t)r * cols], cols) *
                                        dot_exact(&x[(size_t)b * cols], &x[(size_t)b * cols], cols));
                double exact_same = dot_exact(&wdq[(size_t)r * cols], xs, cols);
                double exact_orig = dot_exact(&w[(size_t)r * cols], &x[(size_t)b * cols], cols);
                worst_kernel = worst_of(worst_kernel, std::fabs(o1 - exact_same) / norm);
                worst_quant = worst_of(worst_quant, std::fabs(o1 - exact_orig) / norm);
            }
        }
        printf("kernel %-5s vs exact: %.2e (budget %.0e), vs unquantized: %.5f (budget %.4f)\n",
               ggml_type_info(c.type).name, worst_kernel, MAX_KERNEL_ERR, worst_quant, c.budget);
        CHECK(worst_kernel <= MAX_KERNEL_ERR, "%s kernel error %.2e", ggml_type_info(c.type).name, worst_kernel);
        CHECK(worst_quant <= c.budget, "%s quantized dot error %.5f", ggml_type_info(c.type).name, worst_quant);
    }

    // vectorized exp inside swiglu and softmax vs libm
    std::vector<float> g = randn(1000, 3), u = randn(1000, 4), s = g;
    for (float& v : g) v *= 10.0f;
    std::vector<float> gg = g;
    vec_swiglu(gg.data(), u.data(), 1000);
    for (int i = 0; i < 1000; i++) {
        double ref = g[i] / (1.0 + std::exp(-(double)g[i])) * u[i];
        CHECK(std::fabs(gg[i] - ref) <= 1e-5 * (1 + std::fabs(ref)), "swiglu(%g) = %g, expected %g", g[i], gg[i], ref);
    }
    std::vector<float> sm = s;
    vec_softmax(sm.data(), 1000);
    double z = 0;
    float mx = *std::max_element(s.begin(), s.end());
    for (float v : s) z += std::exp((double)v - mx);
    for (int i = 0; i < 1000; i++) {
        double ref = std::exp((double)s[i] - mx) / z;
        CHECK(std::fabs(sm[i] - ref) <= 1e-6 + 1e-5 * ref, "softmax[%d] = %g, expected %g", i, sm[i], ref);
    }
}

static std::vector<std::string> pieces_of(const std::string& text, PreTokenizer pre) {
    std::vector<CodePoint> cps = utf8_split(text);
    Pieces p;
    pretokenize(pre, cps, &p);
    std::vector<std::string> out;
    for (auto [a, b] : p) out.push_back(text.substr(cps[a].off, cps[b - 1].off + cps[b - 1].len - cps[a].off));
    return out;
}

static std::vector<std::string> pieces_of(const std::string& text, bool llama3) {
    return pieces_of(text, llama3 ? PRE_LLAMA3 : PRE_GPT2);
}

static void test_pretokenizer() {
    auto eq = [](const std::vector<std::string>& a, const std::vector<std::string>& b) { return a == b; };
    CHECK(eq(pieces_of("Hello  world's 123!!\n\n x", false),
             {"Hello", " ", " world", "'s", " 123", "!!", "\n\n", " x"}), "gpt2 split");
    CHECK(eq(pieces_of("你好，世界 abc  ", false), {"你好", "，", "世界", " abc", "  "}), "gpt2 split zh");
    CHECK(eq(pieces_of("I'M 12345 ok\r\n\n  x", true), {"I", "'M", " ", "123", "45", " ok", "\r\n\n", " ", " x"}),
          "llama3 split");
    // llama.cpp's other pre-tokenizers (tests/test_vicuna_tokenizers.py runs llama.cpp's cases)
    CHECK(eq(pieces_of("I'M 12345 ok", PRE_QWEN2), {"I", "'M", " ", "1", "2", "3", "4", "5", " ok"}), "qwen2 split");
    CHECK(eq(pieces_of("x\xcc\x81y ab\xcc\x81", PRE_QWEN35), {"x\xcc\x81y", " ab\xcc\x81"}), "qwen35 marks");
    CHECK(eq(pieces_of("x\xcc\x81y", PRE_QWEN2), {"x", "\xcc\x81y"}), "qwen2 has no marks");
    CHECK(eq(pieces_of("a 12 b", PRE_DIGITS_GPT2), {"a", " ", "1", "2", " b"}), "starcoder split");
    CHECK(eq(pieces_of("x 1234567, (a)", PRE_FALCON), {"x", " ", "123", "456", "7", ",", " ", "(", "a", ")"}),
          "falcon split");
    std::string bad = "a\xff\xfe b";  // invalid UTF-8 survives as bytes
    std::vector<std::string> p = pieces_of(bad, false);
    std::string joined;
    for (auto& s : p) joined += s;
    CHECK(joined == bad, "invalid UTF-8 must survive pre-tokenization");
    CHECK(utf8_incomplete_tail("ab\xe4\xbd") == 2 && utf8_incomplete_tail("ab\xe4\xbd\xa0") == 0 &&
              utf8_incomplete_tail("x") == 0, "utf8_incomplete_tail");
}

static void test_printer() {
    StreamPrinter p;
    p.stops = {"\nUser:"};
    const char* pieces[] = {"Hello", " wor", "ld", "\nUs", "er: more"};
    bool stopped = false;
    for (const char* s : pieces) {
        stopped = printer_add(&p, s);
        if (stopped) break;
    }
    printer_finish(&p);
    CHECK(stopped, "the stop string was not seen");
    CHECK(p.printed == 11 && p.text.compare(0, 11, "Hello world") == 0, "printed %zu bytes", p.printed);
    StreamPrinter q;  // a UTF-8 character split over two tokens is held back
    printer_add(&q, "\xe4\xbd");
    CHECK(q.printed == 0, "half a character was printed");
    printer_add(&q, "\xa0");
    CHECK(q.printed == 3, "the completed character was not printed");
}

static void test_sampler() {
    std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.9f};
    Sampler s;
    s.temp = 0.0f;
    s.repeat_penalty = 1.0f;
    CHECK(sampler_sample(&s, logits.data(), 4, {}) == 1, "greedy must take the argmax");
    s.repeat_penalty = 2.0f;
    CHECK(sampler_sample(&s, logits.data(), 4, {1}) == 3, "repetition penalty must demote token 1");
    s.temp = 1.0f;
    s.top_k = 1;
    s.repeat_penalty = 1.0f;
    for (int i = 0; i < 10; i++) CHECK(sampler_sample(&s, logits.data(), 4, {}) == 1, "top-k 1 is greedy");
    s.top_k = 0;
    s.top_p = 1.0f;
    Sampler a = s, b = s;
    sampler_seed(&a, 42);
    sampler_seed(&b, 42);
    int counts[4] = {0};
    for (int i = 0; i < 2000; i++) {
        int x = sampler_sample(&a, logits.data(), 4, {}), y = sampler_sample(&b, logits.data(), 4, {});
        CHECK(x == y, "same seed, different samples");
        counts[x]++;
    }
    CHECK(counts[1] > counts[0] && counts[3] > counts[2] && counts[2] > 0, "samples do not follow the softmax");
}

struct CountTask {
    std::atomic<int> next{0};
    std::atomic<long> sum{0};
};
static void count_worker(void* p, int, int) {
    CountTask* t = (CountTask*)p;
    for (int i; (i = t->next.fetch_add(1)) < 1000;) t->sum += i;
}

static void test_pool() {
    ThreadPool pool;
    pool_init(&pool, 4);
    for (int rep = 0; rep < 300; rep++) {
        CountTask t;
        pool_run(&pool, count_worker, &t);
        CHECK(t.sum == 999 * 1000 / 2, "pool lost work: %ld", t.sum.load());
    }
    pool_free(&pool);
}

static void test_worst_of() {
    CHECK(worst_of(0.5, 0.25) == 0.5 && worst_of(0.25, 0.5) == 0.5, "worst_of is not the max");
    CHECK(std::isnan(worst_of(0.0, NAN)) && std::isnan(worst_of(NAN, 1.0)), "worst_of drops a NaN");
    CHECK(!(worst_of(worst_of(0.0, NAN), 0.0) <= MAX_KERNEL_ERR), "a NaN error passes a budget check");
}

// A GGUF v3 file in memory: no metadata, F32 tensors of `n` elements at the given offsets.
static std::vector<uint8_t> tiny_gguf(const std::vector<std::pair<std::string, uint64_t>>& tensors, uint64_t n,
                                      size_t data_bytes) {
    std::vector<uint8_t> b;
    auto put = [&](const void* p, size_t k) { b.insert(b.end(), (const uint8_t*)p, (const uint8_t*)p + k); };
    auto u32 = [&](uint32_t v) { put(&v, 4); };
    auto u64 = [&](uint64_t v) { put(&v, 8); };
    u32(GGUF_MAGIC);
    u32(3);
    u64(tensors.size());
    u64(0);
    for (const auto& [name, offset] : tensors) {
        u64(name.size());
        put(name.data(), name.size());
        u32(1);
        u64(n);
        u32(GGML_TYPE_F32);
        u64(offset);
    }
    b.resize((b.size() + 31) / 32 * 32 + data_bytes, 0);
    return b;
}

// The message of the Error `fn` throws, or "" when it returns.
template <class F>
static std::string error_of(F fn) {
    try {
        fn();
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

static void test_gguf_layout_checks() {
    GGUFFile f;
    auto parse = [&](const std::vector<uint8_t>& buf) {
        return error_of([&] { gguf_init_from_buffer(&f, buf.data(), buf.size(), "t.gguf"); });
    };
    // back to back (32 bytes each), and with a gap: fine
    CHECK(parse(tiny_gguf({{"a.weight", 0}, {"b.weight", 32}}, 8, 64)).empty(), "adjacent tensors refused");
    CHECK(parse(tiny_gguf({{"b.weight", 64}, {"a.weight", 0}}, 8, 96)).empty(), "a gap between tensors refused");
    // the same bytes twice, one inside the other, a partial overlap (listed in any order)
    struct {
        std::vector<std::pair<std::string, uint64_t>> t;
        uint64_t n;
    } overlapping[] = {{{{"a.weight", 0}, {"b.weight", 0}}, 8},
                       {{{"big.weight", 0}, {"small.weight", 32}}, 16},
                       {{{"b.weight", 32}, {"a.weight", 0}}, 16},
                       {{{"x.weight", 0}, {"y.weight", 64}, {"z.weight", 32}}, 16}};
    for (auto& c : overlapping) {
        std::string msg = parse(tiny_gguf(c.t, c.n, 256));
        CHECK(msg.find("overlap") != std::string::npos, "overlapping tensors not detected: '%s'", msg.c_str());
        int named = 0;
        for (auto& [name, off] : c.t) named += msg.find("'" + name + "'") != std::string::npos;
        CHECK(named == 2, "the message does not name the two tensors: '%s'", msg.c_str());
        CHECK(msg.find('\n') == std::string::npos && msg.find(": error: ") != std::string::npos, "not one line: '%s'",
              msg.c_str());
    }
    std::string msg = parse(tiny_gguf({{"a.weight", 0}, {"b.weight", 16}}, 4, 64));
    CHECK(msg.find("not a multiple of the alignment") != std::string::npos && msg.find("'b.weight'") != std::string::npos,
          "a misaligned offset: '%s'", msg.c_str());
    msg = parse(tiny_gguf({{"a.weight", 0}, {"b.weight", 32}}, 8, 48));
    CHECK(msg.find("truncated") != std::string::npos && msg.find("'b.weight'") != std::string::npos,
          "a tensor past the end of the file: '%s'", msg.c_str());
}

// Paths that are not regular files fail at once, naming what they are (a FIFO used to block
// open() forever).
static void test_gguf_not_a_regular_file() {
    char dir[] = "/tmp/vicuna-test-XXXXXX";
    if (!mkdtemp(dir)) {
        CHECK(false, "mkdtemp: %s", strerror(errno));
        return;
    }
    std::string fifo = std::string(dir) + "/model.gguf";
    CHECK(mkfifo(fifo.c_str(), 0600) == 0, "mkfifo: %s", strerror(errno));
    struct {
        std::string path;
        const char* kind;
    } cases[] = {{fifo, "named pipe"}, {dir, "directory"}, {"/dev/zero", "character device"},
                 {"/dev/null", "character device"}};
    for (auto& c : cases) {
        GGUFFile f;
        double t0 = time_s();
        std::string msg = error_of([&] { gguf_init_from_file(&f, c.path.c_str()); });
        CHECK(msg.find(c.kind) != std::string::npos && msg.find(printable(c.path)) != std::string::npos,
              "%s: '%s'", c.path.c_str(), msg.c_str());
        CHECK(time_s() - t0 < 5.0, "%s: took %.1f s", c.path.c_str(), time_s() - t0);
    }
    unlink(fifo.c_str());
    rmdir(dir);
}

// Chat templates: literals read out of Jinja, Python's strip, recognition by markers and the
// one-line error for an unknown template (tests/test_vicuna_templates.py checks the rendered ids
// against transformers on real templates).
static void test_templates() {
    std::vector<std::string> lits = jinja_literals(
        "a 'out' b {{ 'x\\ny' + \"q\\\"}}\" }}{# 'not' #}{% set s = 'S\\u00e9' %}'tail'");
    CHECK(lits.size() == 3 && lits[0] == "x\ny" && lits[1] == "q\"}}" && lits[2] == "S\xc3\xa9",
          "jinja_literals: %zu literals", lits.size());
    std::string v;
    CHECK(jinja_assigned_literal("{% set d = x %}{% set d = \"26 Jul 2024\" %}", "d", &v) && v == "26 Jul 2024",
          "jinja_assigned_literal: '%s'", v.c_str());
    CHECK(py_strip(" \t\xe3\x80\x80" "a b\n\x1c") == "a b" && py_strip("  ").empty() && py_strip("x") == "x",
          "py_strip");
    PromptType ours;
    struct Case {
        const char* tmpl;
        const char* name;
        PromptType ours;
    } cases[] = {
        {"{{'<|im_start|>' + message['role'] + '\\n'}}", "chatml", PROMPT_NONE},
        {"{{ bos_token }}<|start_header_id|>x<|end_header_id|>", "llama3", PROMPT_NONE},
        {"{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}<<SYS>>", "llama2", PROMPT_NONE},
        {"{{ bos_token }}{{ '[INST] ' + message['content'] + ' [/INST]' }}", "mistral-legacy", PROMPT_NONE},
        {"{{- ' [INST] ' + system_message + '\\n\\n' }}", "mistral-v1", PROMPT_NONE},
        {"[AVAILABLE_TOOLS] {{- \"[INST] \" }}", "mistral-v3", PROMPT_NONE},
        {"[AVAILABLE_TOOLS] {{- \"[INST]\" + x }}", "mistral-v3-tekken", PROMPT_NONE},
        {"{{ \"Below is an instruction that describes a task. \" }}", "instruct", PROMPT_INSTRUCT},
        {"The following is a conversation between an AI assistant called Assistant", "chat", PROMPT_CHAT},
    };
    for (const Case& c : cases) {
        std::string msg = error_of([&] {
            ChatTemplate t = detect_chat_template(c.tmpl, "m.gguf", &ours);
            CHECK(!strcmp(t.name, c.name) && ours == c.ours, "'%s' detected as %s", c.tmpl, t.name);
        });
        CHECK(msg.empty(), "'%s': %s", c.tmpl, msg.c_str());
    }
    ChatTemplate q = detect_chat_template(
        "{% if x %}{{ '<|im_start|>system\\n' + y + '<|im_end|>' }}{% else %}{{ '<|im_start|>system\\nBe nice.<|im_end|>\\n' }}"
        "{% endif %}", "m.gguf", &ours);
    CHECK(q.has_default_system && q.default_system == "Be nice.", "default system '%s'", q.default_system.c_str());
    for (const char* bad : {"<start_of_turn>{{ x }}", "[INST] {{ x }}", "<|im_start|><|im_sep|>", "[SYSTEM_PROMPT][INST]"}) {
        std::string msg = error_of([&] { detect_chat_template(bad, "m.gguf", &ours); });
        CHECK(msg.find("--prompt-type") != std::string::npos && msg.find('\n') == std::string::npos,
              "'%s' gave '%s'", bad, msg.c_str());
    }
    std::string msg = error_of([&] { detect_chat_template("<start_of_turn>", "m.gguf", &ours); });
    CHECK(msg.find("<|im_start|>") != std::string::npos && msg.find("[INST]") != std::string::npos &&
              msg.find("<|start_header_id|>") != std::string::npos,
          "the error does not name the markers: '%s'", msg.c_str());
}

// LoRA (lora.h, forward.h): y = W x + scale * B (A x) through matmul's fused dispatch -- odd row
// counts (partial panels), ranks that are not a multiple of 8, decode and prefill batches, three
// threads, W F32 and Q8_0, A/B F32 and F16 -- against a double-precision reference on the same
// operands; and the merge at load (W' = W + scale B A in W's type) against the same reference.
static void test_lora() {
    ThreadPool pool;
    pool_init(&pool, 3);
    const int cols = 96, rank = 5;
    const int row_counts[] = {37, 8, 3};
    for (uint32_t wtype : {(uint32_t)GGML_TYPE_F32, (uint32_t)GGML_TYPE_Q8_0}) {
        for (uint32_t abtype : {(uint32_t)GGML_TYPE_F32, (uint32_t)GGML_TYPE_F16}) {
            for (int rows : row_counts) {
                size_t rb = row_size(wtype, cols), ab_es = abtype == GGML_TYPE_F16 ? 2 : 4;
                std::vector<float> w = randn((size_t)rows * cols, 21), a = randn((size_t)rank * cols, 22),
                                   bm = randn((size_t)rows * rank, 23);
                std::vector<uint8_t> wq(rb * rows), aq(ab_es * rank * cols), bq(ab_es * rows * rank);
                std::vector<float> wdq((size_t)rows * cols), adq(a.size()), bdq(bm.size());
                for (int r = 0; r < rows; r++) {
                    quantize_row(wtype, &w[(size_t)r * cols], &wq[r * rb], cols);
                    dequantize_row(wtype, &wq[r * rb], &wdq[(size_t)r * cols], cols);
                }
                quantize_row(abtype, a.data(), aq.data(), (int64_t)a.size());
                dequantize_row(abtype, aq.data(), adq.data(), (int64_t)a.size());
                quantize_row(abtype, bm.data(), bq.data(), (int64_t)bm.size());
                dequantize_row(abtype, bq.data(), bdq.data(), (int64_t)bm.size());
                Tensor W;
                W.type = wtype, W.rows = rows, W.cols = cols, W.row_bytes = rb, W.data = wq.data();
                LoraWeight L;
                L.rank = rank;
                L.scale = 0.75f;
                L.a.type = abtype, L.a.rows = rank, L.a.cols = cols, L.a.row_bytes = ab_es * cols, L.a.data = aq.data();
                Tensor Bt;
                Bt.type = abtype, Bt.rows = rows, Bt.cols = rank, Bt.row_bytes = ab_es * rank, Bt.data = bq.data();
                lora_prepare(&L, Bt, "test", 32);
                for (int r = 0; r < rows; r++)
                    for (int k = 0; k < rank; k++)
                        CHECK(lora_load_panel(&L, r, k) == bdq[(size_t)r * rank + k], "B panel (%d, %d)", r, k);
                W.lora = &L;
                Config cfg{};
                cfg.dim = cols, cfg.hidden_dim = cols, cfg.n_heads = 1, cfg.n_kv_heads = 1, cfg.head_dim = cols;
                cfg.rope_dim = 2, cfg.vocab_size = rows, cfg.n_layers = 1;
                RunState st;
                state_init(&st, &cfg, 8, 8, pool.n_threads);
                for (int B : {1, 2, 6}) {
                    std::vector<float> x = randn((size_t)B * cols, 24 + B), out((size_t)B * rows), other((size_t)B * rows);
                    Tensor W2 = W;  // a second job without LoRA in the same dispatch
                    W2.lora = nullptr;
                    matmul(&pool, &st, x.data(), B, {{&W, out.data()}, {&W2, other.data()}});
                    // what the int8 kernels see of x for a quantized W
                    std::vector<float> xw = x;
                    if (wtype != GGML_TYPE_F32) {
                        std::vector<BlockQ8A> xq((size_t)B * cols / QK);
                        quantize_act(x.data(), xq.data(), (int64_t)B * cols);
                        for (size_t i = 0; i < xq.size(); i++)
                            for (int j = 0; j < QK; j++) xw[i * QK + j] = xq[i].d * xq[i].qs[j];
                    }
                    double worst = 0;
                    for (int b = 0; b < B; b++) {
                        std::vector<double> t(rank);
                        for (int k = 0; k < rank; k++) t[k] = dot_exact(&adq[(size_t)k * cols], &x[(size_t)b * cols], cols);
                        for (int r = 0; r < rows; r++) {
                            double base = dot_exact(&wdq[(size_t)r * cols], &xw[(size_t)b * cols], cols), delta = 0;
                            for (int k = 0; k < rank; k++) delta += bdq[(size_t)r * rank + k] * t[k];
                            double ref = base + L.scale * delta;
                            worst = worst_of(worst, std::fabs(out[(size_t)b * rows + r] - ref) / (1.0 + std::fabs(ref)));
                            CHECK(std::fabs(other[(size_t)b * rows + r] - base) <= 1e-4 * (1.0 + std::fabs(base)),
                                  "the job without LoRA got %g, expected %g", other[(size_t)b * rows + r], base);
                        }
                    }
                    CHECK(worst <= 1e-5, "lora %s W, %s A/B, %d rows, B = %d: error %.2e", ggml_type_info(wtype).name,
                          ggml_type_info(abtype).name, rows, B, worst);
                }
                // merged at load: W + scale B A in W's type
                Adapter ad;
                Tensor Wm = W;
                Wm.lora = nullptr;
                lora_merge_into(&Wm, &L, &ad, &pool);
                CHECK(Wm.data != W.data && Wm.type == wtype, "merge: the weight was not replaced");
                double worst = 0;
                std::vector<float> row(cols);
                for (int r = 0; r < rows; r++) {
                    dequantize_row(wtype, Wm.data + (size_t)r * rb, row.data(), cols);
                    for (int i = 0; i < cols; i++) {
                        double ref = wdq[(size_t)r * cols + i];
                        for (int k = 0; k < rank; k++) ref += (double)L.scale * bdq[(size_t)r * rank + k] * adq[(size_t)k * cols + i];
                        worst = worst_of(worst, std::fabs(row[i] - ref));
                    }
                }
                double budget = wtype == GGML_TYPE_F32 ? 1e-5 : 0.05;  // Q8_0: one rounding of |values| < ~5
                CHECK(worst <= budget, "merge %s: error %.2e", ggml_type_info(wtype).name, worst);
            }
        }
    }
    pool_free(&pool);
}

// The merge on K-quant and Q5 bases (lora.h requantizes each updated row in W's type): the
// merged weights against W + scale B A in double, as an rms error relative to the result, within
// the type's round-trip budget (one more rounding on the same grid).
static void test_lora_merge_kquants() {
    ThreadPool pool;
    pool_init(&pool, 2);
    const int cols = 512, rows = 9, rank = 4;
    struct {
        uint32_t type;
        double budget;
    } cases[] = {{GGML_TYPE_Q4_K, MAX_ROUNDTRIP_ERR_Q4_K}, {GGML_TYPE_Q5_K, MAX_ROUNDTRIP_ERR_Q5_K},
                 {GGML_TYPE_Q6_K, MAX_ROUNDTRIP_ERR_Q6_K}, {GGML_TYPE_Q5_0, MAX_ROUNDTRIP_ERR_Q5_0},
                 {GGML_TYPE_Q5_1, MAX_ROUNDTRIP_ERR_Q5_1}};
    for (auto& c : cases) {
        size_t rb = row_size(c.type, cols);
        std::vector<float> w = randn((size_t)rows * cols, 31), a = randn((size_t)rank * cols, 32),
                           bm = randn((size_t)rows * rank, 33), wdq((size_t)rows * cols);
        std::vector<uint8_t> wq(rb * rows);
        for (int r = 0; r < rows; r++) {
            quantize_row(c.type, &w[(size_t)r * cols], &wq[r * rb], cols);
            dequantize_row(c.type, &wq[r * rb], &wdq[(size_t)r * cols], cols);
        }
        Tensor W;
        W.type = c.type, W.rows = rows, W.cols = cols, W.row_bytes = rb, W.data = wq.data();
        LoraWeight L;
        L.rank = rank;
        L.scale = 0.5f;
        L.a.type = GGML_TYPE_F32, L.a.rows = rank, L.a.cols = cols, L.a.row_bytes = 4 * cols;
        L.a.data = (const uint8_t*)a.data();
        Tensor Bt;
        Bt.type = GGML_TYPE_F32, Bt.rows = rows, Bt.cols = rank, Bt.row_bytes = 4 * rank, Bt.data = (const uint8_t*)bm.data();
        lora_prepare(&L, Bt, "test", 32);
        Adapter ad;
        lora_merge_into(&W, &L, &ad, &pool);
        CHECK(W.data != wq.data() && W.type == c.type, "merge %s: the weight was not replaced", ggml_type_info(c.type).name);
        double err = 0, ref2 = 0;
        std::vector<float> row(cols);
        for (int r = 0; r < rows; r++) {
            dequantize_row(c.type, W.data + (size_t)r * rb, row.data(), cols);
            for (int i = 0; i < cols; i++) {
                double ref = wdq[(size_t)r * cols + i];
                for (int k = 0; k < rank; k++) ref += (double)L.scale * bm[(size_t)r * rank + k] * a[(size_t)k * cols + i];
                err += (row[i] - ref) * (row[i] - ref);
                ref2 += ref * ref;
            }
        }
        double e = std::sqrt(err / ref2);
        CHECK(e <= c.budget, "merge %s: rms error %.4f exceeds %.4f", ggml_type_info(c.type).name, e, c.budget);
    }
    pool_free(&pool);
}

// Deterministic test data with no libm in it: each value is an Irwin-Hall sum of four xorshift
// uniforms (exact float operations), in super-blocks of varying scale and offset, some all zero.
static std::vector<float> golden_input(int n) {
    uint64_t s = 0x9e3779b97f4a7c15ull;
    std::vector<float> v((size_t)n);
    for (int i = 0; i < n; i++) {
        float acc = 0.0f;
        for (int k = 0; k < 4; k++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            acc += (float)(s >> 40) / 16777216.0f;
        }
        int blk = i / 256;
        float scale = (float)(1 + blk % 5) * 0.25f, offset = blk % 3 == 1 ? 0.5f : 0.0f;
        v[(size_t)i] = blk % 7 == 6 ? 0.0f : (acc - 2.0f) * scale + offset;
    }
    return v;
}

static uint64_t fnv1a(const uint8_t* p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

// The eight-token K-quant kernels (prefill on AVX-512VL machines) against the one-token ones:
// each token's sum is computed in the same order, so the results are equal.
static void test_kernels_8_tokens() {
    const int cols = 512, B = 8;
    std::vector<float> w = randn(cols, 41), x = randn((size_t)B * cols, 42);
    std::vector<BlockQ8A> xq((size_t)B * cols / QK);
    std::vector<BlockQ8K> xqk((size_t)B * cols / QK_K);
    quantize_act(x.data(), xq.data(), (int64_t)B * cols);
    quantize_act_k(x.data(), xqk.data(), (int64_t)B * cols);
    for (uint32_t t : {GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K}) {
        std::vector<uint8_t> wq(row_size(t, cols));
        quantize_row(t, w.data(), wq.data(), cols);
        float o8[8];
        dot_row<8>(t, wq.data(), x.data(), xq.data(), xqk.data(), 0, cols, o8);
        for (int b = 0; b < B; b++) {
            float o1 = 0.0f;
            dot_row<1>(t, wq.data(), x.data(), xq.data(), xqk.data(), b, cols, &o1);
            CHECK(o8[b] == o1, "%s: 8-token kernel %g differs from 1-token %g (token %d)", ggml_type_info(t).name, o8[b], o1, b);
        }
    }
}

// The repacked Q4_K/Q5_K/Q6_K kernels (8 rows a call, prefill): the AVX2 / AVX-512 VNNI kernel equals
// its portable twin exactly (same integer sums, same fma order), and both agree with the row
// kernels on the file's layout to float rounding.
static void test_kernels_x8() {
    const int cols = 768, rows = 8, B = 9, nsb = cols / QK_K;
    std::vector<float> w = randn((size_t)rows * cols, 51), x = randn((size_t)B * cols, 52);
    for (int j = 0; j < cols; j++) w[j] += 0.5f;  // row 0 with a large minimum
    std::vector<BlockQ8K> xqk((size_t)B * nsb);
    std::vector<BlockQ8A> xq((size_t)B * cols / QK);
    quantize_act_k(x.data(), xqk.data(), (int64_t)B * cols);
    const BlockQ8K* xs[B];
    for (int b = 0; b < B; b++) xs[b] = xqk.data() + (size_t)b * nsb;
    for (uint32_t t : {GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K}) {
        const char* name = ggml_type_info(t).name;
        const size_t rb = row_size(t, cols);
        std::vector<uint8_t> wq(rows * rb);
        for (int r = 0; r < rows; r++) quantize_row(t, &w[(size_t)r * cols], &wq[r * rb], cols);
        std::vector<uint8_t> pk((size_t)nsb * (t == GGML_TYPE_Q4_K ? sizeof(BlockQ4_Kx8)
                                               : t == GGML_TYPE_Q5_K ? sizeof(BlockQ5_Kx8) : sizeof(BlockQ6_Kx8)));
        if (t == GGML_TYPE_Q4_K) repack_q4_K_x8(wq.data(), rb, nsb, (BlockQ4_Kx8*)pk.data());
        else if (t == GGML_TYPE_Q5_K) repack_q5_K_x8(wq.data(), rb, nsb, (BlockQ5_Kx8*)pk.data());
        else repack_q6_K_x8(wq.data(), rb, nsb, (BlockQ6_Kx8*)pk.data());
        std::vector<float> fast((size_t)B * rows), fast4((size_t)B * rows), ref((size_t)B * rows);
        dot_packed_x8<8>(t, pk.data(), 0, xs, nsb, fast.data(), rows);
        dot_packed_x8<4>(t, pk.data(), 0, xs, nsb, fast4.data(), rows);  // tokens 0-3 again, then 8 alone
        dot_packed_x8<1>(t, pk.data(), 0, xs + 8, nsb, fast.data() + 8 * rows, rows);
        dot_packed_x8<8, true>(t, pk.data(), 0, xs, nsb, ref.data(), rows);
        dot_packed_x8<1, true>(t, pk.data(), 0, xs + 8, nsb, ref.data() + 8 * rows, rows);
        for (int b = 0; b < B; b++) {
            for (int r = 0; r < rows; r++) {
                float f = fast[(size_t)b * rows + r], g = ref[(size_t)b * rows + r], row = 0.0f;
                CHECK(f == g, "%s x8: kernel %g differs from portable %g (token %d row %d)", name, f, g, b, r);
                if (b < 4) CHECK(fast4[(size_t)b * rows + r] == f, "%s x8: 4-token call %g differs from 8-token %g",
                                 name, fast4[(size_t)b * rows + r], f);
                dot_row_ref<1>(t, &wq[r * rb], x.data(), xq.data(), xqk.data(), b, cols, &row);
                CHECK(std::fabs(f - row) <= 1e-4f * (1.0f + std::fabs(row)), "%s x8: %g vs row kernel %g (token %d row %d)",
                      name, f, row, b, r);
            }
        }
    }
}

// The K-quant and Q5 quantizers against llama.cpp's own quantize_row_*_ref (vendored ggml-quants.c
// of llama-cpp-python 0.3.36, compiled and run on golden_input(4096)): FNV-1a of the blocks.
// tests/test_vicuna_kquants.py checks whole files against llama_model_quantize as well.
static void test_quant_golden() {
    std::vector<float> x = golden_input(4096);
    struct {
        uint32_t type;
        uint64_t hash;
    } cases[] = {{GGML_TYPE_Q4_K, 0x0cf48cd9b6083e98ull}, {GGML_TYPE_Q5_K, 0xad412512fb7044d1ull},
                 {GGML_TYPE_Q6_K, 0xaeae92c9d1cc769dull}, {GGML_TYPE_Q5_0, 0x62496631bdbbfe71ull},
                 {GGML_TYPE_Q5_1, 0xdeb974b8425ae9c9ull}};
    for (auto& c : cases) {
        std::vector<uint8_t> q(row_size(c.type, 4096));
        quantize_row(c.type, x.data(), q.data(), 4096);
        uint64_t h = fnv1a(q.data(), q.size());
        CHECK(h == c.hash, "%s blocks differ from llama.cpp's (hash %016llx, expected %016llx)",
              ggml_type_info(c.type).name, (unsigned long long)h, (unsigned long long)c.hash);
    }
}

// Q2_K and Q3_K have no quantizer here: random blocks (with sane fp16 scales) go through the
// float path, SIMD against portable and against an exact dot of the dequantized row.
static void test_kernels_read_only() {
    const int cols = 512, B = 5;
    std::vector<float> x = randn((size_t)B * cols, 21);
    std::vector<BlockQ8A> xq((size_t)B * cols / QK);
    std::vector<BlockQ8K> xqk((size_t)B * cols / QK_K);
    quantize_act(x.data(), xq.data(), (int64_t)B * cols);
    quantize_act_k(x.data(), xqk.data(), (int64_t)B * cols);
    std::mt19937_64 rng(5);
    for (uint32_t t : {GGML_TYPE_Q2_K, GGML_TYPE_Q3_K}) {
        std::vector<uint8_t> w(row_size(t, cols));
        for (uint8_t& b : w) b = (uint8_t)rng();
        for (int i = 0; i < cols / QK_K; i++) {
            uint8_t* blk = &w[(size_t)i * ggml_type_info(t).block_size];
            uint16_t d = fp32_to_fp16(0.01f), dmin = fp32_to_fp16(0.02f);
            if (t == GGML_TYPE_Q2_K) {
                memcpy(blk + offsetof(BlockQ2_K, d), &d, 2);
                memcpy(blk + offsetof(BlockQ2_K, dmin), &dmin, 2);
            } else {
                memcpy(blk + offsetof(BlockQ3_K, d), &d, 2);
            }
        }
        std::vector<float> wdq(cols);
        dequantize_row(t, w.data(), wdq.data(), cols);
        for (int b = 0; b < B; b++) {
            float o = 0.0f, oref = 0.0f, o4[4];
            dot_row<1>(t, w.data(), x.data(), xq.data(), xqk.data(), b, cols, &o);
            dot_row_ref<1>(t, w.data(), x.data(), xq.data(), xqk.data(), b, cols, &oref);
            double exact = dot_exact(wdq.data(), &x[(size_t)b * cols], cols);
            double norm = std::sqrt(dot_exact(wdq.data(), wdq.data(), cols) * dot_exact(&x[(size_t)b * cols], &x[(size_t)b * cols], cols));
            CHECK(std::fabs(o - exact) <= MAX_KERNEL_ERR * norm && std::fabs(oref - exact) <= MAX_KERNEL_ERR * norm,
                  "%s: kernel %g, portable %g, exact %g", ggml_type_info(t).name, o, oref, exact);
            if (b == 0) {
                dot_row<4>(t, w.data(), x.data(), xq.data(), xqk.data(), 0, cols, o4);
                CHECK(o4[0] == o, "%s: 4-column kernel %g differs from 1-column %g", ggml_type_info(t).name, o4[0], o);
            }
        }
    }
}

static int run_unit() {
    test_worst_of();
    test_gguf_layout_checks();
    test_gguf_not_a_regular_file();
    test_fp16();
    test_quant_roundtrip();
    test_kernels();
    test_quant_golden();
    test_kernels_read_only();
    test_kernels_8_tokens();
    test_kernels_x8();
    test_lora();
    test_lora_merge_kquants();
    test_pretokenizer();
    test_printer();
    test_templates();
    test_sampler();
    test_pool();
    printf("%s: %d failure(s)\n", __func__, g_failures);
    return g_failures ? 1 : 0;
}

// ----------------------------------------------------------------------------
// fuzz: mutate a valid GGUF and feed it to everything that reads one

static const char* const FUZZ_TEXTS[] = {
    "Hello, world! 你好，世界。", "  spaces\tand\nnewlines\n\n", "<|im_start|>user\nhi<|im_end|>", "<s>x</s>",
    "数字 12345 and émojis 🦙", "\xff\xfe invalid bytes \xc3", ""};

// Random text for the tokenizer: ASCII, spaces, CJK, emoji, special-token fragments and
// invalid bytes, mixed.
static std::string fuzz_text(std::mt19937_64& rng) {
    static const char* const parts[] = {"a", "Z", " ", "  ", "\n", "\t", "\r\n", "'s", "'LL", "123", "你", "好，",
                                        "\xf0\x9f\xa6\x99", "\xe2\x96\x81", "<|im_", "start|>", "<s>", "</s",
                                        "<0x41>", "\xc3", "\xa9", "\xff", "\x80", "\xed\xa0\x80", "\xf4\x90\x80\x80",
                                        "\x01", "!!", "..."};
    std::string s;
    int n = (int)(rng() % 24);
    for (int i = 0; i < n; i++) {
        s += parts[rng() % (sizeof parts / sizeof parts[0])];
        if (rng() % 16 == 0) s.push_back('\0');  // NUL bytes are text too
    }
    return s;
}

static void fuzz_one(const std::vector<uint8_t>& buf, std::mt19937_64& rng) {
    GGUFFile f;
    gguf_init_from_buffer(&f, buf.data(), buf.size(), "fuzz.gguf");
    Tokenizer t;
    try {
        tokenizer_init(&t, &f);
        std::vector<std::string> texts(std::begin(FUZZ_TEXTS), std::end(FUZZ_TEXTS));
        for (int i = 0; i < 4; i++) texts.push_back(fuzz_text(rng));
        for (const std::string& s : texts) {
            std::vector<int> ids = tokenizer_encode(&t, s, true);
            for (int id : ids) {
                if (id < 0 || id >= t.n_tokens) FAIL("tokenizer produced id %d outside [0, %d)", id, t.n_tokens);
            }
        }
    } catch (const Error&) {
        // a broken tokenizer still lets us try the model
    }
    // small enough to run? then run a few tokens through the model
    int64_t dim = gguf_get_int(&f, "llama.embedding_length", 0, false, 0, INT64_MAX);
    int64_t layers = gguf_get_int(&f, "llama.block_count", 0, false, 0, INT64_MAX);
    const GGUFTensor* embd = gguf_find_tensor(&f, "token_embd.weight");
    if (dim > 512 || layers > 4 || !embd || embd->ne[1] > 4096) return;
    Engine e;
    engine_init_gguf(&e, &f, 32, 2);
    StreamPrinter pr;
    Sampler s;
    sampler_seed(&s, 1);
    std::vector<int> ids = build_prompt_ids(&e.tok, PROMPT_CHAT, {{"q", "a"}}, "hello 你好");
    if (ids.size() > 16) ids.resize(16);
    if (ids.empty()) ids.push_back(0);
    generate(&e, ids, 4, &s, &pr, true);
}

static uint64_t fuzz_parse_end(const std::vector<uint8_t>& buf) {
    GGUFFile f;
    gguf_init_from_buffer(&f, buf.data(), buf.size(), "seed.gguf");
    return f.data_offset;
}

static int run_fuzz(const char* path, long iters, uint64_t seed, double seconds) {
    std::string data = read_file(path);
    std::vector<uint8_t> orig(data.begin(), data.end());
    uint64_t meta_end = fuzz_parse_end(orig);  // the seed must be valid; mutate mostly its header
    std::mt19937_64 rng(seed);
    auto rnd = [&](uint64_t n) { return n ? rng() % n : 0; };
    static const uint64_t interesting[] = {0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 0x7f, 0x80, 0xff, 0xffff,
                                           0x7fffffff, 0x80000000, 0xffffffff, 1ull << 32, 1ull << 40,
                                           0x7fffffffffffffffull, ~0ull};
    long n_ok = 0, n_err = 0;
    double t0 = time_s();
    long it = 0;
    for (; it < iters && time_s() - t0 < seconds; it++) {
        std::vector<uint8_t> buf = orig;
        int n_mut = 1 + (int)rnd(4);
        for (int m = 0; m < n_mut && !buf.empty(); m++) {
            uint64_t span = rnd(10) < 9 ? std::min<uint64_t>(meta_end, buf.size()) : buf.size();
            uint64_t pos = rnd(span);
            switch (rnd(7)) {
                case 0: buf[pos] ^= (uint8_t)(1u << rnd(8)); break;
                case 1: buf[pos] = (uint8_t)interesting[rnd(15)]; break;
                case 2: {
                    uint64_t v = interesting[rnd(sizeof interesting / sizeof interesting[0])];
                    size_t w = rnd(2) ? 8 : 4;
                    if (pos + w <= buf.size()) memcpy(&buf[pos], &v, w);
                    break;
                }
                case 3: buf.resize(pos); break;
                case 4: {
                    uint64_t len = 1 + rnd(64);
                    buf.erase(buf.begin() + pos, buf.begin() + std::min<uint64_t>(buf.size(), pos + len));
                    break;
                }
                case 5: {
                    uint64_t len = 1 + rnd(64);
                    uint64_t end = std::min<uint64_t>(buf.size(), pos + len);
                    std::vector<uint8_t> dup(buf.begin() + pos, buf.begin() + end);
                    buf.insert(buf.begin() + pos, dup.begin(), dup.end());
                    break;
                }
                case 6: {
                    uint32_t v = (uint32_t)rnd(16);  // a plausible value type / tensor type / dim count
                    if (pos + 4 <= buf.size()) memcpy(&buf[pos], &v, 4);
                    break;
                }
            }
        }
        try {
            fuzz_one(buf, rng);
            n_ok++;
        } catch (const Error& e) {
            n_err++;
            const char* msg = e.what();
            if (strchr(msg, '\n') || !strstr(msg, ": error: ")) {
                fprintf(stderr, "FAIL: badly formed error message: %s\n", msg);
                return 1;
            }
        }
    }
    printf("fuzz: %ld mutated files in %.1f s: %ld ran, %ld rejected with an error\n", it, time_s() - t0, n_ok,
           n_err);
    return 0;
}

int main(int argc, char** argv) {
    if (argc >= 2 && !strcmp(argv[1], "unit")) return run_unit();
    if (argc >= 2 && !strcmp(argv[1], "cli")) {
        argv[1] = (char*)"vicuna";
        return vicuna_main(argc - 1, argv + 1);
    }
    if (argc == 6 && !strcmp(argv[1], "fuzz")) {
        try {
            return run_fuzz(argv[2], atol(argv[3]), (uint64_t)atoll(argv[4]), atof(argv[5]));
        } catch (const Error& e) {
            fprintf(stderr, "%s\n", e.what());
            return 1;
        }
    }
    fprintf(stderr, "usage: vicuna-test unit | fuzz SEED.gguf ITERS SEED SECONDS | cli ARGS...\n");
    return 2;
}
