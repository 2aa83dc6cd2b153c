// tokenizer.h: the two tokenizers LLaMA-family GGUF files carry, built from their metadata.
//
//   tokenizer.ggml.model = "gpt2"   byte-level BPE (SmolLM2, LLaMA-3, Qwen2, StarCoder, Falcon...):
//                                   text is split by a pre-tokenizer regex, each piece's bytes
//                                   are mapped to printable characters (GPT-2's bytes_to_unicode)
//                                   and merged by rank using tokenizer.ggml.merges.
//   tokenizer.ggml.model = "llama"  SentencePiece BPE (LLaMA-1/2): spaces become U+2581, the
//                                   characters are merged by the score of the merged piece, and
//                                   anything left that is not in the vocabulary falls back to
//                                   <0xXX> byte tokens.
//
// Both first split the text at special tokens (control / user-defined / unknown token types),
// the way Hugging Face matches its added tokens. The target is token-for-token equality with the
// tokenizer a model was trained with: llama.cpp's own tokenizer tests pass for every
// pre-tokenizer implemented here (tests/test_vicuna_tokenizers.py), and an unknown
// tokenizer.ggml.pre is an error, never a fallback; tests/test_vicuna_cpp.py checks a few hundred
// mixed Chinese/English strings against the Hugging Face tokenizers the project trains with.
// SentencePiece puts U+2581 in front of the text even when it starts with a space (as llama.cpp);
// transformers' Metaspace(prepend_scheme="first") does not, which a file asks for with
// vicuna.tokenizer.prepend_scheme = "first". One deliberate difference from llama.cpp: for
// tokenizer.ggml.pre = "smollm" llama.cpp splits digits apart before the regex; transformers'
// GGUF conversion (what our fine-tunes are trained with) does not, so neither do we. The two
// differ only on runs of spaces before a digit.
#pragma once

#include <queue>
#include <unordered_map>
#include <vector>

#include "gguf.h"
#include "unicode_tables.h"

enum TokenType : int32_t {
    TOKEN_NORMAL = 1,
    TOKEN_UNKNOWN = 2,
    TOKEN_CONTROL = 3,
    TOKEN_USER_DEFINED = 4,
    TOKEN_UNUSED = 5,
    TOKEN_BYTE = 6,
};

// ----------------------------------------------------------------------------
// UTF-8 and character classes

enum CharClass : uint8_t { CC_OTHER = 0, CC_LETTER = 1, CC_NUMBER = 2, CC_SPACE = 3 };

struct CodePoint {
    uint32_t cp;   // code point, or the raw byte value for an invalid byte
    uint32_t off;  // byte offset in the text
    uint32_t len;  // bytes
    uint8_t cls;   // CharClass
};

static bool in_ranges(uint32_t cp, const uint32_t (*r)[2], size_t n) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < r[mid][0]) hi = mid;
        else if (cp > r[mid][1]) lo = mid + 1;
        else return true;
    }
    return false;
}

// \s of the regex engines HF uses: the Unicode White_Space property
static bool is_unicode_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0d) || cp == 0x20 || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f ||
           cp == 0x3000;
}

static uint8_t char_class(uint32_t cp) {
    if (is_unicode_space(cp)) return CC_SPACE;
    if (in_ranges(cp, UNICODE_LETTER_RANGES, sizeof UNICODE_LETTER_RANGES / sizeof UNICODE_LETTER_RANGES[0]))
        return CC_LETTER;
    if (in_ranges(cp, UNICODE_NUMBER_RANGES, sizeof UNICODE_NUMBER_RANGES / sizeof UNICODE_NUMBER_RANGES[0]))
        return CC_NUMBER;
    return CC_OTHER;
}

// Length of the valid UTF-8 sequence at s[0..n), or 0 if it is not one (overlong, surrogate,
// truncated, > U+10FFFF).
static size_t utf8_len(const uint8_t* s, size_t n, uint32_t* cp) {
    uint8_t c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    size_t len;
    uint8_t lo = 0x80, hi = 0xbf;  // range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
        *cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        *cp = c & 0x0f;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        *cp = c & 0x07;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else {
        return 0;
    }
    if (n < len || s[1] < lo || s[1] > hi) return 0;
    for (size_t k = 1; k < len; k++) {
        if ((s[k] & 0xc0) != 0x80) return 0;
        *cp = (*cp << 6) | (s[k] & 0x3f);
    }
    return len;
}

// Splits text into code points; an invalid byte becomes a one-byte "character" of class OTHER,
// so nothing is lost (a byte-level tokenizer still encodes it exactly).
static std::vector<CodePoint> utf8_split(std::string_view text) {
    std::vector<CodePoint> out;
    out.reserve(text.size());
    const uint8_t* s = (const uint8_t*)text.data();
    size_t i = 0;
    while (i < text.size()) {
        uint32_t cp;
        size_t len = utf8_len(s + i, text.size() - i, &cp);
        if (len == 0) out.push_back({s[i], (uint32_t)i, 1, CC_OTHER}), len = 1;
        else out.push_back({cp, (uint32_t)i, (uint32_t)len, char_class(cp)});
        i += len;
    }
    return out;
}

static void utf8_append(std::string* out, uint32_t cp) {
    if (cp < 0x80) {
        *out += (char)cp;
    } else if (cp < 0x800) {
        *out += (char)(0xc0 | (cp >> 6));
        *out += (char)(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
        *out += (char)(0xe0 | (cp >> 12));
        *out += (char)(0x80 | ((cp >> 6) & 0x3f));
        *out += (char)(0x80 | (cp & 0x3f));
    } else {
        *out += (char)(0xf0 | (cp >> 18));
        *out += (char)(0x80 | ((cp >> 12) & 0x3f));
        *out += (char)(0x80 | ((cp >> 6) & 0x3f));
        *out += (char)(0x80 | (cp & 0x3f));
    }
}

// Number of bytes at the end of s that form an incomplete (but so far valid-looking) UTF-8
// sequence: a streaming printer holds them back until the rest arrives.
static size_t utf8_incomplete_tail(std::string_view s) {
    size_t n = s.size();
    for (size_t k = 1; k <= 3 && k <= n; k++) {
        uint8_t c = (uint8_t)s[n - k];
        if ((c & 0xc0) == 0x80) continue;  // continuation byte: keep looking for the lead
        size_t need = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
        return need > k ? k : 0;
    }
    return 0;
}

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the other 68 map to U+0100...
static uint32_t byte_to_unicode(uint8_t b) {
    if ((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae)) return b;
    uint32_t n = 0;
    for (int c = 0; c < b; c++) {
        if (!((c >= 0x21 && c <= 0x7e) || (c >= 0xa1 && c <= 0xac) || (c >= 0xae))) n++;
    }
    return 256 + n;
}

// ----------------------------------------------------------------------------
// pre-tokenizers: split a text fragment into pieces (code point index ranges) that BPE merges
// never cross. Hand-written matchers of the regexes llama.cpp names by tokenizer.ggml.pre,
// alternatives tried in order as a backtracking regex engine would. Each matcher works on a
// range [lo, hi) of the code points: where llama.cpp applies several regexes one after another,
// each later one sees only a piece of the earlier split, lookaheads included.

enum PreTokenizer {
    PRE_GPT2,         // gpt-2, phi-2, mpt, smollm (see the note at the top)
    PRE_LLAMA3,       // llama-bpe, llama3, llama-v3, smaug-bpe: numbers in groups of up to 3
    PRE_QWEN2,        // qwen2, deepseek-r1-qwen: the LLaMA-3 regex with single digits
    PRE_QWEN35,       // qwen35: Qwen2's, with marks (\p{M}) joining letters
    PRE_DIGITS_GPT2,  // starcoder, refact, command-r: every digit alone, then GPT-2's regex
    PRE_FALCON,       // falcon: punctuation runs, then GPT-2's regex, then ASCII digit triples
};

typedef std::vector<std::pair<size_t, size_t>> Pieces;  // [begin, end) in code points

static bool is_mark(uint32_t cp) {
    return cp >= 0x300 &&
           in_ranges(cp, UNICODE_MARK_RANGES, sizeof UNICODE_MARK_RANGES / sizeof UNICODE_MARK_RANGES[0]);
}

static bool is_punct(uint32_t cp) {
    return in_ranges(cp, UNICODE_PUNCT_RANGES, sizeof UNICODE_PUNCT_RANGES / sizeof UNICODE_PUNCT_RANGES[0]);
}

static size_t run_of(const std::vector<CodePoint>& cps, size_t i, size_t hi, uint8_t cls) {
    while (i < hi && cps[i].cls == cls) i++;
    return i;
}

// Contractions 's 't 're 've 'm 'll 'd at i (case-insensitive for LLaMA-3); returns the end or i.
static size_t match_contraction(const std::vector<CodePoint>& cps, size_t i, size_t hi, bool ignore_case) {
    if (cps[i].cp != '\'' || i + 1 >= hi) return i;
    auto low = [&](size_t k) -> uint32_t {
        if (k >= hi) return 0;
        uint32_t c = cps[k].cp;
        return ignore_case && c >= 'A' && c <= 'Z' ? c + 32 : c;
    };
    uint32_t c1 = low(i + 1), c2 = low(i + 2);
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
    if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return i + 3;
    return i;
}

// \s+(?!\S)|\s+ : a run of spaces, leaving the last one to prefix the following word
static size_t match_spaces(const std::vector<CodePoint>& cps, size_t i, size_t hi) {
    size_t j = run_of(cps, i, hi, CC_SPACE);
    if (j < hi && j - i > 1) j--;
    return j;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
static void pretokenize_gpt2(const std::vector<CodePoint>& cps, size_t lo, size_t hi, Pieces* out) {
    size_t i = lo;
    while (i < hi) {
        size_t j = match_contraction(cps, i, hi, false);
        if (j == i) {
            size_t k = i + (cps[i].cp == ' ' ? 1 : 0);  // the optional leading space
            if (k < hi && cps[k].cls != CC_SPACE) j = run_of(cps, k, hi, cps[k].cls);
        }
        if (j == i) j = match_spaces(cps, i, hi);
        out->push_back({i, j});
        i = j;
    }
}

// LLaMA-3 (max_digits 3, marks false):
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//   \s*[\r\n]+|\s+(?!\S)|\s+
// Qwen2: \p{N} instead of \p{N}{1,3}. Qwen3.5 (marks): [\p{L}\p{M}]+ for \p{L}+ and
// [^\s\p{L}\p{M}\p{N}]+ for [^\s\p{L}\p{N}]+.
static void pretokenize_llama3(const std::vector<CodePoint>& cps, size_t lo, size_t hi, Pieces* out,
                               size_t max_digits, bool marks) {
    auto is_nl = [&](size_t k) { return k < hi && (cps[k].cp == '\r' || cps[k].cp == '\n'); };
    auto word = [&](size_t k) { return cps[k].cls == CC_LETTER || (marks && cps[k].cls == CC_OTHER && is_mark(cps[k].cp)); };
    auto symbol = [&](size_t k) { return cps[k].cls == CC_OTHER && !(marks && is_mark(cps[k].cp)); };
    auto word_run = [&](size_t k) {
        while (k < hi && word(k)) k++;
        return k;
    };
    size_t i = lo;
    while (i < hi) {
        size_t j = match_contraction(cps, i, hi, true);
        uint8_t c = cps[i].cls;
        if (j == i) {
            // the optional prefix first (greedy), then without it
            if (c != CC_LETTER && c != CC_NUMBER && !is_nl(i) && i + 1 < hi && word(i + 1)) j = word_run(i + 1);
            else if (word(i)) j = word_run(i);
        }
        if (j == i && c == CC_NUMBER) {
            j = i + 1;
            while (j < hi && j < i + max_digits && cps[j].cls == CC_NUMBER) j++;
        }
        if (j == i) {
            size_t k = i + (cps[i].cp == ' ' ? 1 : 0);
            if (k < hi && symbol(k)) {
                j = k;
                while (j < hi && symbol(j)) j++;
                while (is_nl(j)) j++;
            }
        }
        if (j == i) {
            size_t end = run_of(cps, i, hi, CC_SPACE);
            for (size_t k = i; k < end; k++) {
                if (is_nl(k)) j = k + 1;
            }
        }
        if (j == i) j = match_spaces(cps, i, hi);
        out->push_back({i, j});
        i = j;
    }
}

// \p{N} isolated, then GPT-2's regex on the text between (StarCoder, Refact, Command-R)
static void pretokenize_digits_gpt2(const std::vector<CodePoint>& cps, size_t lo, size_t hi, Pieces* out) {
    size_t start = lo;
    for (size_t k = lo; k < hi; k++) {
        if (cps[k].cls != CC_NUMBER) continue;
        pretokenize_gpt2(cps, start, k, out);
        out->push_back({k, k + 1});
        start = k + 1;
    }
    pretokenize_gpt2(cps, start, hi, out);
}

// Falcon, three regexes in turn: [\p{P}\$\+<=>\^~\|`]+ isolated; GPT-2's regex on every piece;
// then [0-9][0-9][0-9] isolated inside every piece.
static void pretokenize_falcon(const std::vector<CodePoint>& cps, size_t lo, size_t hi, Pieces* out) {
    auto punct = [&](size_t k) {
        uint32_t c = cps[k].cp;
        if (c == '$' || c == '+' || c == '<' || c == '=' || c == '>' || c == '^' || c == '~' || c == '|' || c == '`')
            return true;
        return cps[k].cls == CC_OTHER && !(cps[k].len == 1 && c >= 0x80) && is_punct(c);
    };
    auto ascii_digit = [&](size_t k) { return cps[k].cp >= '0' && cps[k].cp <= '9'; };
    Pieces stage2;
    size_t start = lo;
    for (size_t k = lo; k < hi;) {
        if (!punct(k)) {
            k++;
            continue;
        }
        size_t e = k;
        while (e < hi && punct(e)) e++;
        pretokenize_gpt2(cps, start, k, &stage2);
        stage2.push_back({k, e});
        start = k = e;
    }
    pretokenize_gpt2(cps, start, hi, &stage2);
    for (auto [a, b] : stage2) {
        size_t s = a;
        for (size_t k = a; k + 3 <= b;) {
            if (ascii_digit(k) && ascii_digit(k + 1) && ascii_digit(k + 2)) {
                if (k > s) out->push_back({s, k});
                out->push_back({k, k + 3});
                s = k = k + 3;
            } else {
                k++;
            }
        }
        if (b > s) out->push_back({s, b});
    }
}

static void pretokenize(PreTokenizer pre, const std::vector<CodePoint>& cps, Pieces* out) {
    size_t n = cps.size();
    switch (pre) {
        case PRE_GPT2: pretokenize_gpt2(cps, 0, n, out); break;
        case PRE_LLAMA3: pretokenize_llama3(cps, 0, n, out, 3, false); break;
        case PRE_QWEN2: pretokenize_llama3(cps, 0, n, out, 1, false); break;
        case PRE_QWEN35: pretokenize_llama3(cps, 0, n, out, 1, true); break;
        case PRE_DIGITS_GPT2: pretokenize_digits_gpt2(cps, 0, n, out); break;
        case PRE_FALCON: pretokenize_falcon(cps, 0, n, out); break;
    }
}

// ----------------------------------------------------------------------------
// the tokenizer

struct Tokenizer {
    enum Kind { BPE, SPM } kind = BPE;
    PreTokenizer pre = PRE_GPT2;
    int n_tokens = 0;
    std::vector<std::string_view> pieces;  // (n_tokens,) token text as stored in the GGUF
    std::vector<std::string> decoded;      // (n_tokens,) the bytes each token stands for
    std::vector<float> scores;             // (n_tokens,) SPM merge priority (higher first)
    std::vector<int32_t> types;            // (n_tokens,) TokenType
    std::unordered_map<std::string_view, int> piece_to_id;
    std::unordered_map<uint64_t, std::pair<int, int>> merges;  // BPE: left<<32|right -> (rank, id)
    std::vector<int> specials;  // ids matched verbatim in text, longest first
    bool special_first_byte[256] = {};
    int byte_token[256];        // BPE: token of the byte's character; SPM: <0xXX>; or -1
    int bos = -1, eos = -1, eot = -1, unk = -1;
    bool add_bos = false, add_eos = false, add_space_prefix = false;
    bool ignore_merges = false;  // BPE: a pre-token that is itself a vocabulary entry is that token
    bool prefix_first_only = false;  // SPM: no U+2581 prefix when the text already starts with a space
};

static int tokenizer_special_id(const GGUFFile* f, const char* key, int def, int n_tokens) {
    int64_t id = gguf_get_int(f, key, def, false, -1, INT32_MAX);
    if (id >= n_tokens) {
        fail_at("tokenizer_init", "'%s': %s = %" PRId64 " is not a token id (the vocabulary has %d tokens)",
                printable(f->path).c_str(), key, id, n_tokens);
    }
    return (int)id;
}

static void tokenizer_init(Tokenizer* t, const GGUFFile* f) {
    *t = Tokenizer();
    std::string path = printable(f->path);
    std::string_view model = gguf_get_str(f, "tokenizer.ggml.model", true);
    if (model == "gpt2") t->kind = Tokenizer::BPE;
    else if (model == "llama") t->kind = Tokenizer::SPM;
    else {
        FAIL("'%s': tokenizer.ggml.model '%s' is not supported (vicuna reads 'gpt2', byte-level BPE, and "
             "'llama', SentencePiece)", path.c_str(), printable(model).c_str());
    }
    const GGUFValue* tokens = gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_TYPE_STRING);
    if (!tokens) FAIL("'%s' has no vocabulary (tokenizer.ggml.tokens)", path.c_str());
    if (tokens->arr_len == 0 || tokens->arr_len > (1u << 24)) {
        FAIL("'%s': tokenizer.ggml.tokens has %" PRIu64 " entries (1 to 2^24 expected)", path.c_str(),
             tokens->arr_len);
    }
    int n = t->n_tokens = (int)tokens->arr_len;
    t->pieces = tokens->arr_str;

    t->types.assign(n, TOKEN_NORMAL);
    if (const GGUFValue* types = gguf_get_arr(f, "tokenizer.ggml.token_type", GGUF_TYPE_INT32)) {
        if (types->arr_len != (uint64_t)n) {
            FAIL("'%s': tokenizer.ggml.token_type has %" PRIu64 " entries for %d tokens", path.c_str(),
                 types->arr_len, n);
        }
        for (int i = 0; i < n; i++) t->types[i] = gguf_arr_at<int32_t>(types, i);
    }
    t->scores.resize(n);
    const GGUFValue* scores = gguf_get_arr(f, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32);
    if (scores && scores->arr_len != (uint64_t)n) {
        FAIL("'%s': tokenizer.ggml.scores has %" PRIu64 " entries for %d tokens", path.c_str(), scores->arr_len, n);
    }
    for (int i = 0; i < n; i++) t->scores[i] = scores ? gguf_arr_at<float>(scores, i) : -(float)i;

    t->piece_to_id.reserve((size_t)n * 2);
    for (int i = 0; i < n; i++) t->piece_to_id.emplace(t->pieces[i], i);  // first id wins on duplicates

    bool spm = t->kind == Tokenizer::SPM;
    t->bos = tokenizer_special_id(f, "tokenizer.ggml.bos_token_id", spm ? 1 : -1, n);
    t->eos = tokenizer_special_id(f, "tokenizer.ggml.eos_token_id", spm ? 2 : -1, n);
    t->eot = tokenizer_special_id(f, "tokenizer.ggml.eot_token_id", -1, n);
    t->unk = tokenizer_special_id(f, "tokenizer.ggml.unknown_token_id", spm ? 0 : -1, n);
    if (spm && t->bos >= n) t->bos = -1;
    t->add_bos = gguf_get_bool(f, "tokenizer.ggml.add_bos_token", spm) && t->bos >= 0;
    t->add_eos = gguf_get_bool(f, "tokenizer.ggml.add_eos_token", false) && t->eos >= 0;
    t->add_space_prefix = gguf_get_bool(f, "tokenizer.ggml.add_space_prefix", spm);
    std::string_view scheme = gguf_get_str(f, "vicuna.tokenizer.prepend_scheme", false);
    if (!scheme.empty() && scheme != "always" && scheme != "first") {
        FAIL("'%s': vicuna.tokenizer.prepend_scheme '%s' is not 'always' (SentencePiece) or 'first' (Hugging "
             "Face Metaspace)", path.c_str(), printable(scheme).c_str());
    }
    t->prefix_first_only = scheme == "first";

    for (int b = 0; b < 256; b++) {
        std::string s;
        if (spm) {
            char hex[8];
            snprintf(hex, sizeof hex, "<0x%02X>", b);
            s = hex;
        } else {
            utf8_append(&s, byte_to_unicode((uint8_t)b));
        }
        auto it = t->piece_to_id.find(s);
        t->byte_token[b] = it == t->piece_to_id.end() ? -1 : it->second;
    }

    if (!spm) {
        // llama.cpp's names (llama-vocab.cpp); a name not here is refused, never guessed at
        static const struct {
            const char* name;
            PreTokenizer pre;
            bool ignore_merges;
        } PRES[] = {
            {"gpt-2", PRE_GPT2, false},
            {"phi-2", PRE_GPT2, false},
            {"mpt", PRE_GPT2, false},
            {"smollm", PRE_GPT2, false},  // llama.cpp: digits apart first (see the top of this file)
            {"llama-bpe", PRE_LLAMA3, true},
            {"llama3", PRE_LLAMA3, true},
            {"llama-v3", PRE_LLAMA3, true},
            {"smaug-bpe", PRE_LLAMA3, false},
            {"qwen2", PRE_QWEN2, false},
            {"deepseek-r1-qwen", PRE_QWEN2, false},
            {"qwen35", PRE_QWEN35, false},
            {"starcoder", PRE_DIGITS_GPT2, false},
            {"refact", PRE_DIGITS_GPT2, false},
            {"command-r", PRE_DIGITS_GPT2, false},
            {"falcon", PRE_FALCON, false},
        };
        std::string_view pre = gguf_get_str(f, "tokenizer.ggml.pre", false);
        if (pre.empty()) {
            FAIL("'%s': tokenizer.ggml.pre is missing (llama.cpp then splits with its 'default' regex, which "
                 "vicuna does not implement)", path.c_str());
        }
        bool known = false;
        for (const auto& p : PRES) {
            if (pre == p.name) t->pre = p.pre, t->ignore_merges = p.ignore_merges, known = true;
        }
        if (!known) {
            FAIL("'%s': tokenizer.ggml.pre '%s' is not supported (vicuna implements gpt-2, phi-2, mpt, "
                 "smollm, llama-bpe, llama3, llama-v3, smaug-bpe, qwen2, deepseek-r1-qwen, qwen35, starcoder, "
                 "refact, command-r, falcon)", path.c_str(), printable(pre).c_str());
        }
        const GGUFValue* merges = gguf_get_arr(f, "tokenizer.ggml.merges", GGUF_TYPE_STRING);
        if (!merges) FAIL("'%s': a byte-level BPE tokenizer needs tokenizer.ggml.merges", path.c_str());
        t->merges.reserve((size_t)merges->arr_len * 2);
        std::string joined;
        for (uint64_t r = 0; r < merges->arr_len; r++) {
            std::string_view m = merges->arr_str[r];
            size_t sp = m.size() > 1 ? m.find(' ', 1) : std::string_view::npos;
            if (sp == std::string_view::npos) {
                FAIL("'%s': merge #%" PRIu64 " '%s' is not two tokens separated by a space", path.c_str(), r,
                     printable(m).c_str());
            }
            std::string_view a = m.substr(0, sp), b = m.substr(sp + 1);
            joined.assign(a.data(), a.size());
            joined.append(b.data(), b.size());
            auto ia = t->piece_to_id.find(a), ib = t->piece_to_id.find(b), ij = t->piece_to_id.find(joined);
            if (ia == t->piece_to_id.end() || ib == t->piece_to_id.end() || ij == t->piece_to_id.end()) continue;
            uint64_t key = (uint64_t)(uint32_t)ia->second << 32 | (uint32_t)ib->second;
            t->merges.emplace(key, std::make_pair((int)r, ij->second));
        }
    }

    // what each token prints as
    t->decoded.resize(n);
    uint32_t unicode_to_byte[512];
    for (uint32_t& v : unicode_to_byte) v = 0xffffffff;
    for (int b = 0; b < 256; b++) unicode_to_byte[byte_to_unicode((uint8_t)b)] = (uint32_t)b;
    for (int i = 0; i < n; i++) {
        std::string_view p = t->pieces[i];
        int32_t type = t->types[i];
        std::string& d = t->decoded[i];
        if (type == TOKEN_CONTROL || type == TOKEN_UNKNOWN || type == TOKEN_UNUSED) continue;
        if (spm) {
            unsigned v;
            if (type == TOKEN_BYTE && p.size() == 6 && sscanf(std::string(p).c_str(), "<0x%2X>", &v) == 1) {
                d += (char)v;
                continue;
            }
            for (size_t k = 0; k < p.size(); k++) {
                if (k + 3 <= p.size() && p.substr(k, 3) == "\xe2\x96\x81") {  // U+2581 lower one eighth block
                    d += ' ';
                    k += 2;
                } else {
                    d += p[k];
                }
            }
        } else if (type == TOKEN_USER_DEFINED) {
            d.assign(p.data(), p.size());
        } else {
            for (const CodePoint& c : utf8_split(p)) {
                bool invalid_byte = c.len == 1 && c.cp >= 0x80;
                if (!invalid_byte && c.cp < 512 && unicode_to_byte[c.cp] != 0xffffffff)
                    d += (char)unicode_to_byte[c.cp];
                else
                    d.append(p.data() + c.off, c.len);
            }
        }
    }

    // special tokens, matched in text before anything else (longest first)
    for (int i = 0; i < n; i++) {
        int32_t type = t->types[i];
        if ((type == TOKEN_CONTROL || type == TOKEN_USER_DEFINED || type == TOKEN_UNKNOWN) && !t->pieces[i].empty()) {
            t->specials.push_back(i);
            t->special_first_byte[(uint8_t)t->pieces[i][0]] = true;
        }
    }
    std::stable_sort(t->specials.begin(), t->specials.end(),
                     [&](int a, int b) { return t->pieces[a].size() > t->pieces[b].size(); });
}

// Byte-level BPE of one pre-token: start from one symbol per byte, then repeatedly apply the
// lowest-ranked merge present (leftmost first on ties), as HF's BPE does with its heap.
static void bpe_encode_piece(const Tokenizer* t, std::string_view bytes, std::vector<int>* out) {
    struct Sym {
        int id, prev, next;
    };
    struct Cand {
        int rank, pos, left, right, merged;
        bool operator<(const Cand& o) const {  // priority_queue pops the largest: invert
            return rank != o.rank ? rank > o.rank : pos > o.pos;
        }
    };
    int n = (int)bytes.size();
    if (t->ignore_merges && n > 1) {
        std::string chars;
        for (char b : bytes) utf8_append(&chars, byte_to_unicode((uint8_t)b));
        auto it = t->piece_to_id.find(chars);
        if (it != t->piece_to_id.end()) {
            out->push_back(it->second);
            return;
        }
    }
    std::vector<Sym> sym(n);
    for (int i = 0; i < n; i++) sym[i] = {t->byte_token[(uint8_t)bytes[i]], i - 1, i + 1 < n ? i + 1 : -1};
    std::priority_queue<Cand> heap;
    auto push = [&](int l) {
        if (l < 0 || sym[l].next < 0) return;
        int r = sym[l].next;
        if (sym[l].id < 0 || sym[r].id < 0) return;
        auto it = t->merges.find((uint64_t)(uint32_t)sym[l].id << 32 | (uint32_t)sym[r].id);
        if (it != t->merges.end()) heap.push({it->second.first, l, sym[l].id, sym[r].id, it->second.second});
    };
    for (int i = 0; i + 1 < n; i++) push(i);
    while (!heap.empty()) {
        Cand c = heap.top();
        heap.pop();
        int r = sym[c.pos].next;
        if (sym[c.pos].id != c.left || r < 0 || sym[r].id != c.right) continue;  // stale
        sym[c.pos].id = c.merged;
        sym[c.pos].next = sym[r].next;
        if (sym[r].next >= 0) sym[sym[r].next].prev = c.pos;
        sym[r].id = -2;  // dead
        push(sym[c.pos].prev);
        push(c.pos);
    }
    for (int i = 0; i >= 0 && i < n; i = sym[i].next) {
        // a byte with no token (SmolLM2 has none for 0x04, 0x06, ...) is dropped, as Hugging Face's
        // BPE without an unk_token and llama.cpp do: never the unknown id, which may be EOS
        if (sym[i].id >= 0) out->push_back(sym[i].id);
    }
}

// SentencePiece BPE of one fragment (already with U+2581 for spaces): merge the adjacent pair
// whose concatenation is the highest-scoring vocabulary piece, leftmost on ties.
static void spm_encode_fragment(const Tokenizer* t, std::string_view text, std::vector<int>* out) {
    struct Sym {
        uint32_t off, len;
        int prev, next;
    };
    struct Cand {
        float score;
        int pos;
        uint32_t len;  // total length when pushed, to detect stale entries
        bool operator<(const Cand& o) const { return score != o.score ? score < o.score : pos > o.pos; }
    };
    std::vector<CodePoint> cps = utf8_split(text);
    int n = (int)cps.size();
    std::vector<Sym> sym(n);
    for (int i = 0; i < n; i++) sym[i] = {cps[i].off, cps[i].len, i - 1, i + 1 < n ? i + 1 : -1};
    std::priority_queue<Cand> heap;
    auto push = [&](int l) {
        if (l < 0 || sym[l].next < 0) return;
        int r = sym[l].next;
        uint32_t len = sym[l].len + sym[r].len;
        auto it = t->piece_to_id.find(text.substr(sym[l].off, len));
        if (it == t->piece_to_id.end() || t->types[it->second] != TOKEN_NORMAL) return;
        heap.push({t->scores[it->second], l, len});
    };
    for (int i = 0; i + 1 < n; i++) push(i);
    while (!heap.empty()) {
        Cand c = heap.top();
        heap.pop();
        Sym& l = sym[c.pos];
        if (l.len == 0 || l.next < 0 || l.len + sym[l.next].len != c.len) continue;  // stale
        Sym& r = sym[l.next];
        l.len += r.len;
        r.len = 0;
        l.next = r.next;
        if (r.next >= 0) sym[r.next].prev = c.pos;
        push(l.prev);
        push(c.pos);
    }
    for (int i = 0; i >= 0 && i < n; i = sym[i].next) {
        std::string_view piece = text.substr(sym[i].off, sym[i].len);
        auto it = t->piece_to_id.find(piece);
        if (it != t->piece_to_id.end() && t->types[it->second] != TOKEN_BYTE) {
            out->push_back(it->second);
            continue;
        }
        for (char ch : piece) {  // byte fallback
            int id = t->byte_token[(uint8_t)ch];
            if (id >= 0) out->push_back(id);
            else if (t->unk >= 0) out->push_back(t->unk);
        }
    }
}

// Encodes text; add_special adds BOS/EOS as the GGUF says (like HF's add_special_tokens).
// Special-token text ("<|im_start|>", "<s>") is always recognised, as HF does.
static std::vector<int> tokenizer_encode(const Tokenizer* t, std::string_view text, bool add_special) {
    std::vector<int> out;
    if (add_special && t->add_bos) out.push_back(t->bos);
    size_t start = 0, i = 0;
    auto flush = [&](size_t end) {  // encode text[start, end)
        if (end <= start) return;
        std::string_view frag = text.substr(start, end - start);
        if (t->kind == Tokenizer::BPE) {
            std::vector<CodePoint> cps = utf8_split(frag);
            // A byte that is not UTF-8 is its byte token; where the vocabulary has none (SmolLM2 lacks
            // 0xC0, 0xC1, 0xF5..0xFF, bytes UTF-8 text never holds) it becomes U+FFFD, as in llama.cpp.
            std::string fixed;
            for (const CodePoint& c : cps) {
                if (c.len == 1 && c.cp >= 0x80 && t->byte_token[c.cp] < 0) {
                    for (const CodePoint& d : cps) {
                        if (d.len == 1 && d.cp >= 0x80 && t->byte_token[d.cp] < 0) fixed += "\xef\xbf\xbd";
                        else fixed.append(frag.data() + d.off, d.len);
                    }
                    frag = fixed;
                    cps = utf8_split(frag);
                    break;
                }
            }
            Pieces pieces;
            pretokenize(t->pre, cps, &pieces);
            for (auto [a, b] : pieces) {
                size_t off = cps[a].off, len = cps[b - 1].off + cps[b - 1].len - off;
                bpe_encode_piece(t, frag.substr(off, len), &out);
            }
        } else {
            // HF Metaspace(prepend_scheme="first"): spaces -> U+2581, and U+2581 in front of the
            // first fragment of the text unless it already starts with one
            static const std::string_view SPACE = "\xe2\x96\x81";
            std::string s;
            for (char c : frag) {
                if (c == ' ') s += SPACE;
                else s += c;
            }
            if (start == 0 && t->add_space_prefix && !(t->prefix_first_only && s.compare(0, SPACE.size(), SPACE) == 0))
                s.insert(0, SPACE);
            spm_encode_fragment(t, s, &out);
        }
    };
    while (i < text.size()) {
        int found = -1;
        if (t->special_first_byte[(uint8_t)text[i]]) {
            for (int id : t->specials) {
                std::string_view p = t->pieces[id];
                if (text.size() - i >= p.size() && text.compare(i, p.size(), p) == 0) {
                    found = id;
                    break;
                }
            }
        }
        if (found < 0) {
            i++;
            continue;
        }
        flush(i);
        out.push_back(found);
        i += t->pieces[found].size();
        start = i;
    }
    flush(text.size());
    if (add_special && t->add_eos) out.push_back(t->eos);
    return out;
}

static bool tokenizer_is_eog(const Tokenizer* t, int id) { return id == t->eos || id == t->eot; }
