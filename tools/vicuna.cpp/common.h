// common.h: errors, fp16 conversion and small utilities shared by every part of the engine.
//
// Errors: every failure the user can cause (bad file, bad flag, full context) throws an Error
// whose message is exactly one line, "<function>: error: <what>, <where>; <fix>". The CLI
// (vicuna_main in cli.h) prints it and exits with status 1; the tests catch it. Nothing calls
// abort() or exit() deep inside, so the fuzz loop in test.cpp can run the reader in-process under
// ASan.
#pragma once

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <chrono>
#include <ctime>
#include <stdexcept>
#include <string>
#include <string_view>

#if !defined(VICUNA_SCALAR) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VICUNA_AVX2 1
#include <immintrin.h>
#endif

// ----------------------------------------------------------------------------
// errors

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

[[noreturn]] __attribute__((format(printf, 2, 3)))
static void fail_at(const char* func, const char* fmt, ...) {
    char msg[1024];
    int n = snprintf(msg, sizeof msg, "%s: error: ", func);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
    va_end(ap);
    for (char* p = msg; *p; p++) {
        if (*p == '\n' || *p == '\r') *p = ' ';  // one line, whatever a file name contains
    }
    throw Error(msg);
}
#define FAIL(...) fail_at(__func__, __VA_ARGS__)

// A string from a file or the command line, made safe to quote in a one-line message:
// non-printable bytes become \xNN and long strings are cut.
static std::string printable(std::string_view s, size_t max_len = 80) {
    std::string out;
    for (size_t i = 0; i < s.size(); i++) {
        if (out.size() >= max_len) {
            out += "...";
            break;
        }
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c < 0x7f) {
            out += (char)c;
        } else {
            char b[8];
            snprintf(b, sizeof b, "\\x%02x", c);
            out += b;
        }
    }
    return out;
}

static double time_s() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

// CPU seconds used by this process, all threads
static double cpu_time_s() {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// ----------------------------------------------------------------------------
// fp16 <-> fp32
//
// The *_ref versions are portable and bit-exact (round to nearest even, like numpy's
// astype(np.float16) and F16C); the test checks them against the hardware path.

[[maybe_unused]] static float fp16_to_fp32_ref(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (mant << 13);  // inf or nan
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
    } else if (mant == 0) {
        bits = sign;  // +-0
    } else {
        // subnormal half: mant * 2^-24, exactly representable as a float
        float f = (float)mant * (1.0f / 16777216.0f);
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

[[maybe_unused]] static uint16_t fp32_to_fp16_ref(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffff;
    if (x > 0x7f800000) return sign | 0x7e00;   // nan stays (quiet) nan
    if (x >= 0x477ff000) return sign | 0x7c00;  // >= 65520 rounds to inf
    if (x < 0x38800000) {
        // result is subnormal (or zero): let the FPU round by adding 0.5, whose ulp is 2^-24,
        // the half-precision subnormal step
        float a;
        memcpy(&a, &x, 4);
        a += 0.5f;
        uint32_t r;
        memcpy(&r, &a, 4);
        return sign | (uint16_t)(r - 0x3f000000);
    }
    uint32_t odd = (x >> 13) & 1;  // ties to even
    x += 0xc8000fffu + odd;        // rebias 127 -> 15 and round at bit 13
    return sign | (uint16_t)(x >> 13);
}

static inline float fp16_to_fp32(uint16_t h) {
#ifdef VICUNA_AVX2
    return _cvtsh_ss(h);
#else
    return fp16_to_fp32_ref(h);
#endif
}

static inline uint16_t fp32_to_fp16(float f) {
#ifdef VICUNA_AVX2
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    return fp32_to_fp16_ref(f);
#endif
}
