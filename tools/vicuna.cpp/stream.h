// stream.h: printing generated text as it comes. A token can end in the middle of a UTF-8
// character or of a stop string ("\nUser:"), so StreamPrinter holds back what may still change
// and prints only valid UTF-8 (invalid bytes become U+FFFD), like prompt.py's StopStringFilter.
#pragma once

#include <algorithm>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer.h"

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

// Python's str.strip() for the whitespace a model emits
static std::string strip(std::string_view s) {
    size_t a = 0, b = s.size();
    while (a < b && is_space(s[a])) a++;
    while (b > a && is_space(s[b - 1])) b--;
    return std::string(s.substr(a, b - a));
}

// Valid UTF-8 for the terminal: each invalid byte becomes U+FFFD, as HF's decode does. A
// byte-level model can emit any bytes (a tiny random one does).
static std::string utf8_sanitize(std::string_view s) {
    std::string out;
    out.reserve(s.size());
    size_t i = 0;
    while (i < s.size()) {
        uint32_t cp;
        size_t len = utf8_len((const uint8_t*)s.data() + i, s.size() - i, &cp);
        if (len == 0) {
            out += "\xef\xbf\xbd";
            i++;
        } else {
            out.append(s.data() + i, len);
            i += len;
        }
    }
    return out;
}

// Streams generated text, holding back what may still turn into a stop string or is an
// incomplete UTF-8 character; like prompt.py's StopStringFilter. What it prints is valid UTF-8.
struct StreamPrinter {
    std::vector<std::string> stops;
    FILE* out = nullptr;  // nullptr: collect only
    std::string text;     // everything generated
    size_t printed = 0;
    size_t cut = std::string::npos;  // where the first stop string starts
};

static void printer_emit(StreamPrinter* p, size_t end) {
    if (end > p->printed) {
        if (p->out) {
            std::string clean = utf8_sanitize(std::string_view(p->text).substr(p->printed, end - p->printed));
            fwrite(clean.data(), 1, clean.size(), p->out);
            fflush(p->out);
        }
        p->printed = end;
    }
}

// Adds a piece; returns true once a stop string has appeared.
static bool printer_add(StreamPrinter* p, std::string_view piece) {
    p->text.append(piece.data(), piece.size());
    for (const std::string& s : p->stops) {
        size_t pos = p->text.find(s);
        if (pos != std::string::npos) p->cut = std::min(p->cut, pos);
    }
    if (p->cut != std::string::npos) return true;
    size_t hold = utf8_incomplete_tail(p->text);
    for (const std::string& s : p->stops) {
        for (size_t k = std::min(s.size() - 1, p->text.size()); k > hold; k--) {
            if (p->text.compare(p->text.size() - k, k, s, 0, k) == 0) {
                hold = k;
                break;
            }
        }
    }
    if (!p->stops.empty()) {  // trailing spaces are cut at the end (rstrip), so hold them too
        size_t n = p->text.size() - hold;
        while (n > p->printed && is_space(p->text[n - 1])) n--, hold++;
    }
    printer_emit(p, p->text.size() - hold);
    return false;
}

static void printer_finish(StreamPrinter* p) {
    size_t end = std::min(p->cut, p->text.size());
    if (!p->stops.empty()) {
        while (end > p->printed && is_space(p->text[end - 1])) end--;
    }
    printer_emit(p, end);
}
