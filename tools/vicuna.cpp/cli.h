// cli.h: the vicuna command line: argument parsing and the subcommands run, chat, tokenize,
// eval, bench, perplexity and quantize, each a cmd_* function over the engine's parts.
// vicuna_main is the whole program (main.cpp calls it; test.cpp runs it under the sanitizers).
// Errors anywhere below are one line on stderr and exit status 1.
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "engine.h"
#include "gguf.h"
#include "perplexity.h"
#include "prompt.h"
#include "quantize.h"
#include "sampler.h"
#include "stream.h"
#include "tokenizer.h"

static const char* const USAGE =
    "usage: vicuna COMMAND [options]\n"
    "\n"
    "commands:\n"
    "  run        -m F.gguf -p TEXT [-n N] [-t THREADS] [-c CTX] [--temp T] [--top-k K] [--top-p P]\n"
    "             [--repeat-penalty R] [--seed S] [--prompt-type T] [--system TEXT] [--ids 1,2,3]\n"
    "             [--print-ids] [--ignore-eos] [-v]\n"
    "             print a completion, streaming (--temp 0: greedy); no template unless --prompt-type;\n"
    "             -v prints the prompt's token ids on stderr first (template and BOS included)\n"
    "  chat       -m F.gguf [--prompt-type T] [--system TEXT] [-n N] [-c CTX] [sampling options] [-v]\n"
    "             [--dry-run]\n"
    "             interactive chat on stdin (/clear forgets the history, /exit quits), in the file's\n"
    "             template unless --prompt-type; -v prints each prompt's ids on stderr; --dry-run runs\n"
    "             no model: each user line is followed by a line taken as the answer (\\n \\t \\r \\\\\n"
    "             escapes in both), and the prompt ids are printed on stdout\n"
    "             T: auto (the file's: vicuna.prompt_type, else tokenizer.chat_template), none,\n"
    "             instruct, chat, chat_template (the file's tokenizer.chat_template)\n"
    "  tokenize   -m F.gguf (-p TEXT | -f FILE [--lines]) [--prompt-type T] [--no-bos]\n"
    "             print token ids; --lines: one text per line, \\n \\t \\r \\\\ escapes, one line of ids each\n"
    "  eval       -m F.gguf (-p TEXT | --ids 1,2,3) --dump-logits OUT.bin\n"
    "             write the last position's logits (vocab float32, little-endian)\n"
    "  bench      -m F.gguf [-t THREADS] [-p 512] [-n 128] [-v]\n"
    "             time a prompt and a generation: prints 'prefill: X tok/s' and 'decode: Y tok/s'\n"
    "             (-v adds wall and CPU seconds per phase on stderr)\n"
    "  perplexity -m F.gguf -f TEXT.txt [-c CTX] [--chunks N] [--ref REF.gguf]\n"
    "             perplexity over a text (the first N chunks of CTX tokens), as llama.cpp computes it;\n"
    "             --ref: the same model in a more exact type, for the KL divergence and top-token agreement\n"
    "  quantize   IN.gguf OUT.gguf TYPE [--pure] [--allow-requantize] [--overwrite]\n"
    "             f32/f16 matrices -> q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, q4_1,\n"
    "             q4_0, f16 or f32, in llama.cpp's per-tensor mixes (classifier Q6_K, more bits for attn_v\n"
    "             and ffn_down in the _m mixes; rows not a multiple of 256 fall back to Q5_0/Q5_1/\n"
    "             Q8_0); --pure: one type for every matrix; --allow-requantize also converts\n"
    "             already quantized tensors;\n"
    "             an existing OUT is replaced only with --overwrite\n"
    "\n"
    "run, chat, eval, bench and perplexity also take --lora ADAPTER.gguf [--lora-scale S]\n"
    "[--lora-mode auto|runtime|merge]: a LoRA adapter (tools/convert_gguf.py --lora_path) on the -m\n"
    "base model, whatever its type; S scales its effect (default 1; 0 gives the base model's output\n"
    "exactly). runtime adds scale*B(A x) in the forward pass; merge adds scale*BA to the weights at\n"
    "load, in their own type; auto (default) merges only an adapter over 5% of the bytes a token reads\n";

struct Options {
    std::string command;
    std::vector<std::string> positional;
    std::string model, prompt, file, ids, dump_logits, ref;
    std::string lora;         // --lora ADAPTER.gguf
    float lora_scale = 1.0f;  // --lora-scale
    bool lora_scale_set = false;
    LoraMode lora_mode = LORA_AUTO;  // --lora-mode
    bool lora_mode_set = false;
    PromptType prompt_type = PROMPT_NONE;
    bool prompt_type_set = false;
    std::string system;  // --system TEXT
    bool system_set = false, dry_run = false;
    int n_predict = 256, n_prompt = 512, threads = 0, ctx = 0, chunks = 0;
    bool n_predict_set = false, prompt_set = false;
    float temp = 0.7f, top_p = 0.9f, repeat_penalty = 1.1f;
    int top_k = 40;
    int64_t seed = -1;
    bool print_ids = false, ignore_eos = false, no_bos = false, lines = false, pure = false, verbose = false, requantize = false,
         overwrite = false;
};

static long parse_int(const std::string& flag, const char* v, long lo, long hi) {
    char* end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi) {
        FAIL("%s expects an integer in [%ld, %ld], got '%s'", flag.c_str(), lo, hi, printable(v).c_str());
    }
    return x;
}

static float parse_float(const std::string& flag, const char* v, float lo, float hi) {
    char* end;
    errno = 0;
    float x = strtof(v, &end);
    if (errno || *end || end == v || !(x >= lo && x <= hi)) {
        FAIL("%s expects a number in [%g, %g], got '%s'", flag.c_str(), lo, hi, printable(v).c_str());
    }
    return x;
}

static std::vector<int> parse_ids(const std::string& s) {
    std::vector<int> ids;
    size_t i = 0;
    while (i < s.size()) {
        size_t j = s.find_first_of(", ", i);
        if (j == std::string::npos) j = s.size();
        if (j > i) ids.push_back((int)parse_int("--ids", s.substr(i, j - i).c_str(), 0, INT32_MAX));
        i = j + 1;
    }
    if (ids.empty()) FAIL("--ids expects comma-separated token ids, got '%s'", printable(s).c_str());
    return ids;
}

static Options parse_args(int argc, char** argv) {
    Options o;
    o.command = argv[1];
    // which flags each command takes
    static const std::unordered_map<std::string, std::string> allowed = {
        {"run", " -m -p -n -t -c --temp --top-k --top-p --repeat-penalty --seed --prompt-type --system --ids --print-ids --ignore-eos -v --lora --lora-scale --lora-mode "},
        {"chat", " -m -n -t -c --temp --top-k --top-p --repeat-penalty --seed --prompt-type --system --dry-run -v --lora --lora-scale --lora-mode "},
        {"tokenize", " -m -p -f --lines --prompt-type --no-bos "},
        {"eval", " -m -p --ids --dump-logits -t --lora --lora-scale --lora-mode "},
        {"bench", " -m -p -n -t -v --lora --lora-scale --lora-mode "},
        {"perplexity", " -m -f -c -t --chunks --ref --lora --lora-scale --lora-mode "},
        {"quantize", " --pure --allow-requantize --overwrite "},
    };
    auto cmd = allowed.find(o.command);
    if (cmd == allowed.end()) FAIL("unknown command '%s'; run 'vicuna --help'", printable(o.command).c_str());
    for (int i = 2; i < argc; i++) {
        std::string a = argv[i];
        if (a.size() < 2 || a[0] != '-') {
            o.positional.push_back(a);
            continue;
        }
        if (cmd->second.find(" " + a + " ") == std::string::npos) {
            FAIL("'%s' does not take %s; run 'vicuna --help'", o.command.c_str(), printable(a).c_str());
        }
        if (a == "--print-ids") { o.print_ids = true; continue; }
        if (a == "--ignore-eos") { o.ignore_eos = true; continue; }
        if (a == "--no-bos") { o.no_bos = true; continue; }
        if (a == "--lines") { o.lines = true; continue; }
        if (a == "--pure") { o.pure = true; continue; }
        if (a == "--allow-requantize") { o.requantize = true; continue; }
        if (a == "--overwrite") { o.overwrite = true; continue; }
        if (a == "--dry-run") { o.dry_run = true; continue; }
        if (a == "-v") { o.verbose = true; continue; }
        if (i + 1 >= argc) FAIL("%s needs a value", a.c_str());
        const char* v = argv[++i];
        if (a == "-m") o.model = v;
        else if (a == "-p" && o.command == "bench") o.n_prompt = (int)parse_int(a, v, 1, 1 << 20);
        else if (a == "-p") { o.prompt = v; o.prompt_set = true; }
        else if (a == "-f") o.file = v;
        else if (a == "-n") { o.n_predict = (int)parse_int(a, v, 0, 1 << 20); o.n_predict_set = true; }
        else if (a == "-t") o.threads = (int)parse_int(a, v, 1, 256);
        else if (a == "-c") o.ctx = (int)parse_int(a, v, 1, 1 << 24);
        else if (a == "--chunks") o.chunks = (int)parse_int(a, v, 1, 1 << 24);
        else if (a == "--temp") o.temp = parse_float(a, v, 0.0f, 100.0f);
        else if (a == "--top-k") o.top_k = (int)parse_int(a, v, 0, 1 << 24);
        else if (a == "--top-p") o.top_p = parse_float(a, v, 0.0f, 1.0f);
        else if (a == "--repeat-penalty") o.repeat_penalty = parse_float(a, v, 0.01f, 100.0f);
        else if (a == "--seed") o.seed = parse_int(a, v, -1, INT32_MAX);
        else if (a == "--ids") o.ids = v;
        else if (a == "--dump-logits") o.dump_logits = v;
        else if (a == "--ref") o.ref = v;
        else if (a == "--lora") o.lora = v;
        else if (a == "--lora-scale") { o.lora_scale = parse_float(a, v, -1000.0f, 1000.0f); o.lora_scale_set = true; }
        else if (a == "--lora-mode") {
            std::string t = v;
            o.lora_mode_set = true;
            if (t == "auto") o.lora_mode = LORA_AUTO;
            else if (t == "runtime") o.lora_mode = LORA_RUNTIME;
            else if (t == "merge") o.lora_mode = LORA_MERGE;
            else FAIL("--lora-mode must be auto, runtime or merge, got '%s'", printable(t).c_str());
        }
        else if (a == "--system") { o.system = v; o.system_set = true; }
        else if (a == "--prompt-type") {
            std::string t = v;
            o.prompt_type_set = true;
            if (t == "none") o.prompt_type = PROMPT_NONE;
            else if (t == "instruct") o.prompt_type = PROMPT_INSTRUCT;
            else if (t == "chat") o.prompt_type = PROMPT_CHAT;
            else if (t == "chat_template") o.prompt_type = PROMPT_CHAT_TEMPLATE;
            else if (t == "auto") o.prompt_type = PROMPT_AUTO;
            else FAIL("--prompt-type must be auto, none, instruct, chat or chat_template, got '%s'", printable(t).c_str());
        }
    }
    if (o.command != "quantize") {
        if (!o.positional.empty()) FAIL("unexpected argument '%s'", printable(o.positional[0]).c_str());
        if (o.model.empty()) FAIL("'%s' needs a model: -m F.gguf", o.command.c_str());
        if ((o.lora_scale_set || o.lora_mode_set) && o.lora.empty()) {
            FAIL("%s needs an adapter: --lora ADAPTER.gguf", o.lora_scale_set ? "--lora-scale" : "--lora-mode");
        }
    }
    return o;
}

// --lora ADAPTER.gguf on the loaded base model (lora.h), before anything runs
static void attach_lora(Engine* e, const Options& o) {
    if (o.lora.empty()) return;
    std::string how = lora_attach(&e->model, o.lora.c_str(), o.lora_scale, o.lora_mode, &e->pool);
    if (o.verbose) fprintf(stderr, "%s\n", how.c_str());
}

static Sampler make_sampler(const Options& o) {
    Sampler s;
    s.temp = o.temp;
    s.top_k = o.top_k;
    s.top_p = o.top_p;
    s.repeat_penalty = o.repeat_penalty;
    sampler_seed(&s, o.seed >= 0 ? (uint64_t)o.seed : (uint64_t)std::chrono::steady_clock::now().time_since_epoch().count());
    return s;
}

static std::string read_file(const std::string& path) {
    FILE* fp = fopen(path.c_str(), "rb");
    if (!fp) FAIL("cannot open '%s': %s", printable(path).c_str(), strerror(errno));
    std::string s;
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, fp)) > 0) s.append(buf, n);
    bool err = ferror(fp);
    fclose(fp);
    if (err) FAIL("cannot read '%s'", printable(path).c_str());
    return s;
}

// "a\nb" written as a\\nb on one line
static std::string unescape(std::string_view s) {
    std::string out;
    for (size_t i = 0; i < s.size(); i++) {
        if (s[i] == '\\' && i + 1 < s.size()) {
            char c = s[i + 1];
            if (c == 'n' || c == 't' || c == 'r' || c == '\\') {
                out += c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : '\\';
                i++;
                continue;
            }
        }
        out += s[i];
    }
    return out;
}

static void print_prompt_ids(FILE* fp, const std::vector<int>& ids) {
    std::string line = "prompt ids:";
    for (int id : ids) line += " " + std::to_string(id);
    fprintf(fp, "%s\n", line.c_str());
}

static int cmd_run(const Options& o) {
    if (o.ids.empty() && !o.prompt_set) FAIL("run needs a prompt: -p TEXT (or --ids 1,2,3)");
    Engine e;
    engine_init(&e, o.model.c_str(), o.ctx, o.threads);
    attach_lora(&e, o);
    // a raw completion unless --prompt-type names a template (auto: the file's)
    Template tp = resolve_template(&e.model.file, &e.tok, o.prompt_type, e.model.adapter.prompt_type, o.lora);
    const std::string* system = o.system_set ? &o.system : nullptr;
    check_system(tp, system);
    if (tp.type != PROMPT_NONE) fprintf(stderr, "run: %s\n", template_description(tp, &e.tok).c_str());
    std::vector<int> ids = o.ids.empty() ? template_prompt_ids(tp, &e.tok, system, {}, o.prompt) : parse_ids(o.ids);
    if (o.verbose) print_prompt_ids(stderr, ids);
    if ((int)ids.size() >= e.kv.n_ctx) {
        FAIL("the prompt is %zu tokens and the context %d; raise -c (the model allows %d)", ids.size(), e.kv.n_ctx,
             e.model.cfg.ctx_train);
    }
    Sampler s = make_sampler(o);
    StreamPrinter pr;
    pr.stops = tp.stops;
    pr.out = o.print_ids ? nullptr : stdout;
    int n_new = std::min(o.n_predict, e.kv.n_ctx - (int)ids.size());
    std::vector<int> gen = n_new > 0 ? generate(&e, ids, n_new, &s, &pr, o.ignore_eos, tp.end_ids) : std::vector<int>();
    if (o.print_ids) {
        for (size_t i = 0; i < gen.size(); i++) printf(i ? " %d" : "%d", gen[i]);
    } else {
        printer_finish(&pr);
    }
    printf("\n");
    return 0;
}

// Multi-turn chat in the file's template (or --prompt-type's). --dry-run loads the tokenizer
// only: each user line is followed by its answer on the next line, and the prompt ids each turn
// would feed are printed on stdout, so templates and history trimming are testable without a model.
static int cmd_chat(const Options& o) {
    Engine e;
    GGUFFile dry_file;  // --dry-run: the file and its tokenizer, no weights
    Tokenizer dry_tok;
    const GGUFFile* file;
    const Tokenizer* tok;
    int n_ctx;
    std::string adapter_prompt_type;  // a --lora adapter's vicuna.prompt_type comes first
    if (o.dry_run) {
        if (!o.lora.empty()) {
            GGUFFile adapter;
            gguf_init_from_file(&adapter, o.lora.c_str());
            adapter_prompt_type = std::string(gguf_get_str(&adapter, "vicuna.prompt_type", false));
        }
        gguf_init_from_file(&dry_file, o.model.c_str());
        tokenizer_init(&dry_tok, &dry_file);
        std::string ctx_key = std::string(gguf_get_str(&dry_file, "general.architecture", false)) + ".context_length";
        int ctx_train = (int)gguf_get_int(&dry_file, ctx_key.c_str(), 2048, false, 1, 1 << 24);
        n_ctx = o.ctx > 0 ? o.ctx : std::min(2048, ctx_train);
        file = &dry_file;
        tok = &dry_tok;
    } else {
        engine_init(&e, o.model.c_str(), o.ctx, o.threads);
        attach_lora(&e, o);
        n_ctx = e.kv.n_ctx;
        adapter_prompt_type = e.model.adapter.prompt_type;
        file = &e.model.file;
        tok = &e.tok;
    }
    // the file's template unless --prompt-type names one
    Template tp = resolve_template(file, tok, o.prompt_type_set ? o.prompt_type : PROMPT_AUTO, adapter_prompt_type, o.lora);
    if (tp.type == PROMPT_NONE) FAIL("chat needs a template: --prompt-type auto, chat, instruct or chat_template");
    const std::string* system = o.system_set ? &o.system : nullptr;
    check_system(tp, system);
    fprintf(stderr, "chat: %s\n", template_description(tp, tok).c_str());
    if (n_ctx < 16) FAIL("chat needs a context of at least 16 tokens, got -c %d", n_ctx);
    Sampler s = make_sampler(o);
    // room for the answer: -n, but never more than half the context
    const int max_new = std::max(1, std::min(o.n_predict_set ? o.n_predict : 256, n_ctx / 2));
    bool tty = isatty(0) && !o.dry_run;
    std::vector<Turn> history;
    std::string line;
    auto read_line = [&](std::string* out) {
        if (!std::getline(std::cin, *out)) return false;
        if (!out->empty() && out->back() == '\r') out->pop_back();
        if (o.dry_run) *out = unescape(*out);
        return true;
    };
    for (;;) {
        if (tty) {
            fputs("> ", stdout);
            fflush(stdout);
        }
        if (!read_line(&line)) break;
        if (strip(line).empty()) continue;
        if (line == "/exit" || line == "/quit") break;
        if (line == "/clear") {
            history.clear();
            continue;
        }
        // prompt.py's fit_history: drop the oldest whole turns until the prompt and the answer
        // fit (the system message stays); instruct holds one exchange, so it has no history
        std::vector<Turn> turns = tp.type == PROMPT_INSTRUCT ? std::vector<Turn>() : history;
        std::vector<int> ids = template_prompt_ids(tp, tok, system, turns, line);
        while ((int)ids.size() + max_new > n_ctx && !turns.empty()) {
            turns.erase(turns.begin());
            ids = template_prompt_ids(tp, tok, system, turns, line);
        }
        if ((int)ids.size() + max_new > n_ctx) {
            // the question alone is too long: keep its end (which holds the answer cue)
            size_t lead = tok->bos >= 0 && !ids.empty() && ids[0] == tok->bos ? 1 : 0;
            size_t keep = (size_t)(n_ctx - max_new) - lead;
            fprintf(stderr, "chat: note: your message is %zu tokens; kept its last %zu to fit the context of %d (-c)\n",
                    ids.size(), keep, n_ctx);
            ids.erase(ids.begin() + lead, ids.end() - keep);
        }
        std::string answer;
        if (o.dry_run) {
            print_prompt_ids(stdout, ids);
            fflush(stdout);
            if (!read_line(&answer)) answer.clear();
        } else {
            if (o.verbose) print_prompt_ids(stderr, ids);
            StreamPrinter pr;
            pr.stops = tp.stops;
            pr.out = stdout;
            generate(&e, ids, std::min(max_new, n_ctx - (int)ids.size()), &s, &pr, false, tp.end_ids);
            printer_finish(&pr);
            printf("\n");
            fflush(stdout);
            answer = strip(std::string_view(pr.text).substr(0, std::min(pr.cut, pr.text.size())));
        }
        history = turns;
        history.push_back({line, answer});
    }
    return 0;
}

static void print_ids(const std::vector<int>& ids) {
    std::string line;
    for (size_t i = 0; i < ids.size(); i++) {
        if (i) line += ' ';
        line += std::to_string(ids[i]);
    }
    line += '\n';
    fwrite(line.data(), 1, line.size(), stdout);
}

// The tokenizer alone: no weights are touched, so this is also what the fuzz test drives.
static int cmd_tokenize(const Options& o) {
    if (o.prompt_set == !o.file.empty()) FAIL("tokenize needs exactly one of -p TEXT or -f FILE");
    GGUFFile f;
    gguf_init_from_file(&f, o.model.c_str());
    Tokenizer t;
    tokenizer_init(&t, &f);
    Template tp = resolve_template(&f, &t, o.prompt_type);
    auto encode = [&](const std::string& text) {
        if (tp.type != PROMPT_NONE) return template_prompt_ids(tp, &t, nullptr, {}, text);
        return tokenizer_encode(&t, text, !o.no_bos);
    };
    if (o.prompt_set) {
        print_ids(encode(o.prompt));
    } else if (!o.lines) {
        print_ids(encode(read_file(o.file)));
    } else {
        std::string all = read_file(o.file);
        size_t i = 0;
        while (i < all.size()) {
            size_t j = all.find('\n', i);
            if (j == std::string::npos) j = all.size();
            print_ids(encode(unescape(std::string_view(all).substr(i, j - i))));
            i = j + 1;
        }
    }
    return 0;
}

static int cmd_eval(const Options& o) {
    if (o.dump_logits.empty()) FAIL("eval needs --dump-logits OUT.bin");
    if (o.ids.empty() == !o.prompt_set) FAIL("eval needs exactly one of -p TEXT or --ids 1,2,3");
    GGUFFile f;
    gguf_init_from_file(&f, o.model.c_str());
    std::vector<int> ids;
    if (o.prompt_set) {
        Tokenizer t;
        tokenizer_init(&t, &f);
        ids = tokenizer_encode(&t, o.prompt, true);
    } else {
        ids = parse_ids(o.ids);
    }
    if (ids.empty()) FAIL("the prompt has no tokens");
    Engine e;
    engine_init_gguf(&e, &f, (int)ids.size(), o.threads);  // a context just the prompt's size
    attach_lora(&e, o);
    const float* logits = engine_eval(&e, ids);
    FILE* fp = fopen(o.dump_logits.c_str(), "wb");
    if (!fp) FAIL("cannot create '%s': %s", printable(o.dump_logits).c_str(), strerror(errno));
    size_t n = (size_t)e.model.cfg.vocab_size;
    bool ok = fwrite(logits, sizeof(float), n, fp) == n;  // x86 and ARM are little-endian
    ok = (fclose(fp) == 0) && ok;
    if (!ok) FAIL("cannot write '%s': %s", printable(o.dump_logits).c_str(), strerror(errno));
    return 0;
}

static int cmd_bench(const Options& o) {
    int n_prompt = o.n_prompt, n_gen = o.n_predict_set ? o.n_predict : 128;
    if (n_gen < 1) FAIL("bench needs -n >= 1");
    GGUFFile f;  // the context must hold the prompt and the generation
    gguf_init_from_file(&f, o.model.c_str());
    std::string ctx_key = model_arch_prefix(&f) + "context_length";
    int ctx_train = (int)gguf_get_int(&f, ctx_key.c_str(), 2048, false, 1, 1 << 24);
    if (n_prompt + n_gen > ctx_train) {
        FAIL("-p %d plus -n %d exceed the model's context of %d", n_prompt, n_gen, ctx_train);
    }
    Engine e;
    engine_init_gguf(&e, &f, n_prompt + n_gen, o.threads);
    attach_lora(&e, o);
    int V = e.model.cfg.vocab_size;
    std::vector<int> prompt(n_prompt);
    for (int i = 0; i < n_prompt; i++) prompt[i] = (int)((i * 7919u + 13u) % (unsigned)V);
    float* logits = e.logits.data();
    engine_forward(&e, prompt.data(), std::min(n_prompt, 16), 0, logits, false);  // warm-up: page in weights
    engine_forward(&e, prompt.data(), 1, std::min(n_prompt, 16), logits, false);  // (fits: n_gen >= 1)

    double t0 = time_s(), c0 = cpu_time_s();
    engine_forward(&e, prompt.data(), n_prompt, 0, logits, false);
    double t1 = time_s(), c1 = cpu_time_s();
    for (int i = 0; i < n_gen; i++) {
        int tok = (int)(std::max_element(logits, logits + V) - logits);
        engine_forward(&e, &tok, 1, n_prompt + i, logits, false);
    }
    double t2 = time_s(), c2 = cpu_time_s();
    printf("prefill: %.2f tok/s\n", n_prompt / (t1 - t0));
    printf("decode: %.2f tok/s\n", n_gen / (t2 - t1));
    if (o.verbose) {  // CPU seconds tell how much work a phase was when other jobs share the cores
        fprintf(stderr, "bench: prefill %.3f s wall %.3f s cpu, decode %.3f s wall %.3f s cpu, %d threads\n",
                t1 - t0, c1 - c0, t2 - t1, c2 - c1, e.pool.n_threads);
    }
    return 0;
}

static int cmd_perplexity(const Options& o) {
    if (o.file.empty()) FAIL("perplexity needs a text file: -f TEXT.txt");
    std::string text = read_file(o.file);
    Engine e;
    engine_init(&e, o.model.c_str(), o.ctx > 0 ? o.ctx : 512, o.threads);
    attach_lora(&e, o);
    int n_ctx = e.kv.n_ctx;
    std::vector<int> tokens = tokenizer_encode(&e.tok, text, true);
    int n_chunks = (int)(tokens.size() / (size_t)n_ctx);
    if (o.chunks > 0) n_chunks = std::min(n_chunks, o.chunks);
    if (n_chunks == 0 || n_ctx < 4) {
        FAIL("'%s' is %zu tokens, less than one context of %d; use a longer text or a smaller -c",
             printable(o.file).c_str(), tokens.size(), n_ctx);
    }
    Engine ref;
    if (!o.ref.empty()) {
        engine_init(&ref, o.ref.c_str(), n_ctx, o.threads);
        if (tokenizer_encode(&ref.tok, text, true) != tokens) {
            FAIL("--ref '%s' tokenizes '%s' differently from '%s'; the reference must be the same model in "
                 "another tensor type", printable(o.ref).c_str(), printable(o.file).c_str(), printable(o.model).c_str());
        }
    }
    Perplexity r = perplexity(&e, tokens, n_chunks, stdout, o.ref.empty() ? nullptr : &ref);
    printf("\nFinal estimate: PPL = %.4f +/- %.5f\n", r.ppl, r.err);
    if (!o.ref.empty()) {
        printf("reference: PPL = %.4f (%s)\n", r.ref_ppl, printable(o.ref).c_str());
        printf("PPL ratio: %.5f (%+.3f %%)\n", r.ppl / r.ref_ppl, 100.0 * (r.ppl / r.ref_ppl - 1.0));
        printf("KL divergence: mean %.6f, 99th percentile %.6f\n", r.kl_mean, r.kl_p99);
        printf("same top token: %.2f %% of %ld positions\n", 100.0 * r.top1, r.n_scored);
    }
    return 0;
}

static int cmd_quantize(const Options& o) {
    const char* types = "q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, q4_1, q4_0, f16, f32";
    if (o.positional.size() != 3) FAIL("usage: vicuna quantize IN.gguf OUT.gguf TYPE (TYPE: %s)", types);
    std::string t = o.positional[2];
    for (char& ch : t) ch = (char)tolower((unsigned char)ch);
    const QuantTarget* target = quant_target(t);
    if (!target && (t.rfind("q2_k", 0) == 0 || t.rfind("q3_k", 0) == 0)) {
        FAIL("vicuna quantize does not write '%s' (it runs Q2_K/Q3_K files but has no quantizer for them); "
             "use llama.cpp's llama-quantize, or one of %s", printable(t).c_str(), types);
    }
    if (!target) FAIL("unknown quantization type '%s' (%s)", printable(t).c_str(), types);
    if (o.positional[0] == o.positional[1]) FAIL("the output must not overwrite the input '%s'", printable(o.positional[0]).c_str());
    struct stat st;
    const char* out = o.positional[1].c_str();
    if (lstat(out, &st) == 0) {
        if (S_ISDIR(st.st_mode)) FAIL("the output '%s' is a directory; name a .gguf file", printable(out).c_str());
        if (!o.overwrite) FAIL("the output '%s' exists; pass --overwrite to replace it", printable(out).c_str());
    }
    quantize_file(o.positional[0].c_str(), o.positional[1].c_str(), *target, o.pure, o.requantize);
    return 0;
}

// The CLI, callable from test.cpp: returns the exit status, prints errors as one line.
static int vicuna_main(int argc, char** argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        fputs(USAGE, argc < 2 ? stderr : stdout);
        return argc < 2 ? 1 : 0;
    }
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(USAGE, stdout);
            return 0;
        }
    }
    try {
        Options o = parse_args(argc, argv);
        if (o.command == "run") return cmd_run(o);
        if (o.command == "chat") return cmd_chat(o);
        if (o.command == "tokenize") return cmd_tokenize(o);
        if (o.command == "eval") return cmd_eval(o);
        if (o.command == "bench") return cmd_bench(o);
        if (o.command == "perplexity") return cmd_perplexity(o);
        if (o.command == "quantize") return cmd_quantize(o);
    } catch (const Error& e) {
        fflush(stdout);
        fprintf(stderr, "%s\n", e.what());
        return 1;
    } catch (const std::bad_alloc&) {
        fflush(stdout);
        fprintf(stderr, "vicuna: error: out of memory; try a smaller context (-c)\n");
        return 1;
    }
    return 1;
}
