// prompt.h: the prompt templates. Two kinds:
//
//   - prompt.py's own, byte-identical (INSTRUCT_NO_INPUT, CHAT_PREAMBLE, CHAT_USER,
//     CHAT_TURN_SEPARATOR, STOP_STRINGS) with prompt.py's token layout (build_prompt_ids: each
//     prompt and answer piece encoded on its own, EOS after each answer);
//   - a GGUF's tokenizer.chat_template (Jinja), recognised by distinctive markers the way
//     llama.cpp's llama_chat_apply_template does, not interpreted: ChatML (SmolLM2, Qwen2/2.5/3),
//     Llama-3 (and 3.1+ with its dated system header), Llama-2 [INST] <<SYS>>, Mistral's
//     [INST] variants (v0.1/v0.2 originals, "v1", "v3", "v3-tekken"), and our own instruct/chat
//     templates as tools/convert_gguf.py writes them (rendered with prompt.py's layout, as the
//     model was trained). The rendered text is encoded in one piece, as Hugging Face's
//     apply_chat_template(messages, add_generation_prompt=True) does.
//
// resolve_template() picks the template a command uses: --prompt-type, else the file's
// vicuna.prompt_type, else its tokenizer.chat_template. tests/test_vicuna_cpp.py compares our
// templates with prompt.build_prompt_ids, tests/test_vicuna_templates.py the chat templates with
// transformers' apply_chat_template on the real templates of those model families.
#pragma once

#include <algorithm>
#include <ctime>
#include <string>
#include <vector>

#include "gguf.h"
#include "tokenizer.h"

// PROMPT_AUTO is a request, not a template: "the one the file names".
enum PromptType { PROMPT_NONE, PROMPT_INSTRUCT, PROMPT_CHAT, PROMPT_CHAT_TEMPLATE, PROMPT_AUTO };

static const char* const INSTRUCT_NO_INPUT_HEAD =
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n";
static const char* const INSTRUCT_NO_INPUT_TAIL = "\n\n### Response:\n";
static const char* const CHAT_PREAMBLE =
    "The following is a conversation between an AI assistant called Assistant and a human user "
    "called User. The assistant is intelligent, knowledgeable and polite to answer questions of "
    "user.\n\n";
static const char* const CHAT_USER_HEAD = "User:";
static const char* const CHAT_USER_TAIL = "\n\nAssistant:";
static const char* const CHAT_TURN_SEPARATOR = "\n\n";

static std::vector<std::string> stop_strings(PromptType t) {
    if (t == PROMPT_INSTRUCT) return {"### "};
    if (t == PROMPT_CHAT) return {"\nUser:"};
    return {};
}

struct Turn {
    std::string user, assistant;
};

static void append_ids(std::vector<int>* ids, const std::vector<int>& more) {
    ids->insert(ids->end(), more.begin(), more.end());
}

// Python's str.rstrip("\n")
static std::string rstrip_newlines(std::string s) {
    while (!s.empty() && s.back() == '\n') s.pop_back();
    return s;
}

// prompt.py's build_prompt_ids: the leading special ids (BOS where the tokenizer adds one), then
// each prompt piece and each answered response (+ EOS) encoded on its own. A system text
// replaces chat's preamble (render_chat); instruct has one exchange and no system.
static std::vector<int> build_prompt_ids(const Tokenizer* t, PromptType type, const std::vector<Turn>& history,
                                         const std::string& user, const std::string* system = nullptr) {
    std::vector<int> ids;
    if (t->add_bos) ids.push_back(t->bos);
    if (type == PROMPT_NONE) {
        append_ids(&ids, tokenizer_encode(t, user, false));
    } else if (type == PROMPT_INSTRUCT) {
        append_ids(&ids, tokenizer_encode(t, INSTRUCT_NO_INPUT_HEAD + user + INSTRUCT_NO_INPUT_TAIL, false));
    } else {
        std::string preamble = system ? rstrip_newlines(*system) + "\n\n" : std::string(CHAT_PREAMBLE);
        for (size_t i = 0; i <= history.size(); i++) {
            const std::string& u = i < history.size() ? history[i].user : user;
            std::string prompt = (i == 0 ? preamble : CHAT_TURN_SEPARATOR) + (CHAT_USER_HEAD + u) + CHAT_USER_TAIL;
            append_ids(&ids, tokenizer_encode(t, prompt, false));
            if (i < history.size()) {
                append_ids(&ids, tokenizer_encode(t, history[i].assistant, false));
                if (t->eos >= 0) ids.push_back(t->eos);
            }
        }
    }
    return ids;
}

// ----------------------------------------------------------------------------
// chat templates (tokenizer.chat_template), recognised by their markers

enum ChatFamily {
    FAMILY_CHATML,          // <|im_start|>role\n...<|im_end|>\n
    FAMILY_LLAMA3,          // <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>
    FAMILY_LLAMA2,          // <s>[INST] <<SYS>>\n...\n<</SYS>>\n\nq [/INST] a </s>
    FAMILY_MISTRAL_LEGACY,  // Mistral-7B-Instruct v0.1/v0.2 originals: [INST] q [/INST]a</s>
    FAMILY_MISTRAL_V1,      // mistralai "v1":  [INST] q [/INST] a</s>
    FAMILY_MISTRAL_V3,      // mistralai "v3": [INST] q[/INST] a</s>, system before the last question
    FAMILY_MISTRAL_V3_TEKKEN,  // "v3-tekken": [INST]q[/INST] a</s>
};

struct ChatTemplate {
    ChatFamily family = FAMILY_CHATML;
    const char* name = "";
    bool bos = false;              // the template writes bos_token in front
    bool system_ok = true;         // false: the template raises on a system message
    bool strip = false;            // Llama-2: contents are .strip()ped / | trim
    bool eos_space = false;        // Mistral v0.1: eos_token + ' ' after each answer
    bool has_default_system = false;
    std::string default_system;    // ChatML (SmolLM2, Qwen2/2.5): written when there is no system message
    std::string dated_header;      // Llama-3.1+: "Cutting Knowledge Date: ...\n", always in a system turn
    std::string date;              // Llama-3.1+: its "Today Date: "
    const char* end_of_turn = "";  // the token that ends an answer ("" = EOS)
};

// The Jinja string literal opening at s[*j] (a quote), unescaped; *j ends past its closing quote.
static std::string jinja_read_literal(std::string_view s, size_t* j) {
    char q = s[*j];
    std::string lit;
    size_t k = *j + 1;
    for (; k < s.size() && s[k] != q; k++) {
        if (s[k] != '\\' || k + 1 >= s.size()) {
            lit += s[k];
            continue;
        }
        char e = s[++k];
        if (e == 'n') lit += '\n';
        else if (e == 't') lit += '\t';
        else if (e == 'r') lit += '\r';
        else if (e == 'u' && k + 4 < s.size()) {
            utf8_append(&lit, (uint32_t)strtoul(std::string(s.substr(k + 1, 4)).c_str(), nullptr, 16));
            k += 4;
        } else lit += e;  // \\ \' \"
    }
    *j = k + 1;
    return lit;
}

// The unescaped string literals inside the template's {{ }} and {% %} blocks, in order.
static std::vector<std::string> jinja_literals(std::string_view s) {
    std::vector<std::string> out;
    size_t i = 0;
    while (i < s.size()) {
        size_t open = s.find('{', i);
        if (open == std::string_view::npos || open + 1 >= s.size()) break;
        char kind = s[open + 1];
        if (kind != '{' && kind != '%' && kind != '#') {
            i = open + 1;
            continue;
        }
        std::string_view close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
        size_t j = open + 2;
        while (j < s.size() && s.compare(j, 2, close) != 0) {
            if (kind != '#' && (s[j] == '\'' || s[j] == '"')) out.push_back(jinja_read_literal(s, &j));
            else j++;
        }
        i = j + 2;
    }
    return out;
}

// The first non-empty literal assigned by `set NAME = '...'`, if any.
static bool jinja_assigned_literal(std::string_view s, const char* name, std::string* value) {
    std::string key = std::string("set ") + name + " = ";
    for (size_t p = s.find(key); p != std::string_view::npos; p = s.find(key, p + 1)) {
        size_t j = p + key.size();
        if (j >= s.size() || (s[j] != '\'' && s[j] != '"')) continue;
        std::string lit = jinja_read_literal(s, &j);
        if (lit.empty()) continue;
        *value = lit;
        return true;
    }
    return false;
}

// Python's str.strip() (what Jinja's trim does too): Unicode whitespace and \x1c-\x1f.
static std::string py_strip(std::string_view s) {
    std::vector<CodePoint> cps = utf8_split(s);
    auto ws = [](const CodePoint& c) { return c.cls == CC_SPACE || (c.cp >= 0x1c && c.cp <= 0x1f && c.len == 1); };
    size_t a = 0, b = cps.size();
    while (a < b && ws(cps[a])) a++;
    while (b > a && ws(cps[b - 1])) b--;
    if (a == b) return "";
    return std::string(s.substr(cps[a].off, cps[b - 1].off + cps[b - 1].len - cps[a].off));
}

// The markers looked for, in the order they are tried; an unknown template's error lists them.
static const char* const CHAT_TEMPLATE_MARKERS =
    "'Below is an instruction that describes a task' (our instruct), 'The following is a conversation "
    "between an AI assistant' (our chat), '<|im_start|>' (ChatML), '[INST]' with '[AVAILABLE_TOOLS]', "
    "' [INST] ' + system_message, '<<SYS>>' or '{{ bos_token }}' (Mistral / Llama-2), "
    "'<|start_header_id|>' + '<|end_header_id|>' (Llama-3)";

// Which family a tokenizer.chat_template is, or a one-line error naming what was looked for.
// Sets *ours to PROMPT_INSTRUCT / PROMPT_CHAT for convert_gguf.py's renderings of prompt.py.
static ChatTemplate detect_chat_template(std::string_view tmpl, const std::string& path, PromptType* ours) {
    auto has = [&](const char* m) { return tmpl.find(m) != std::string_view::npos; };
    *ours = PROMPT_NONE;
    ChatTemplate c;
    c.bos = has("bos_token");
    if (has("Below is an instruction that describes a task")) {
        *ours = PROMPT_INSTRUCT;
        c.name = "instruct";
        return c;
    }
    if (has("The following is a conversation between an AI assistant called Assistant")) {
        *ours = PROMPT_CHAT;
        c.name = "chat";
        return c;
    }
    if (has("<|im_start|>")) {
        if (has("<|im_sep|>") || has("<end_of_utterance>")) {
            FAIL("'%s': tokenizer.chat_template is %s, not ChatML, and not supported; pass --prompt-type instruct, "
                 "chat or none", printable(path).c_str(), has("<|im_sep|>") ? "Phi-4's (<|im_sep|>)" : "SmolVLM's");
        }
        c.family = FAMILY_CHATML;
        c.name = "chatml";
        c.end_of_turn = "<|im_end|>";
        for (const std::string& lit : jinja_literals(tmpl)) {  // SmolLM2, Qwen2/2.5: a default system turn
            static const std::string head = "<|im_start|>system\n";
            size_t end = lit.find("<|im_end|>");
            if (lit.compare(0, head.size(), head) == 0 && end != std::string::npos && end > head.size()) {
                c.has_default_system = true;
                c.default_system = lit.substr(head.size(), end - head.size());
                break;
            }
        }
        std::string sys;
        if (!c.has_default_system && jinja_assigned_literal(tmpl, "system_message", &sys) && !sys.empty()) {
            c.has_default_system = true;
            c.default_system = sys;
        }
        return c;
    }
    if (has("[INST]")) {
        c.end_of_turn = "";  // eos_token
        if (has("[SYSTEM_PROMPT]")) {
            FAIL("'%s': tokenizer.chat_template is Mistral's v7 ([SYSTEM_PROMPT]), which vicuna does not render "
                 "yet; pass --prompt-type instruct, chat or none", printable(path).c_str());
        }
        if (has("[AVAILABLE_TOOLS]")) {
            bool tekken = has("\"[INST]\"") || has("'[INST]'");
            c.family = tekken ? FAMILY_MISTRAL_V3_TEKKEN : FAMILY_MISTRAL_V3;
            c.name = tekken ? "mistral-v3-tekken" : "mistral-v3";
            return c;
        }
        if (has("' [INST] ' + system_message")) {
            c.family = FAMILY_MISTRAL_V1;
            c.name = "mistral-v1";
            return c;
        }
        if (has("<<SYS>>") && has("bos_token + '[INST] '")) {
            c.family = FAMILY_LLAMA2;
            c.name = "llama2";
            c.bos = true;
            c.strip = has(".strip()") || has("| trim") || has("|trim");
            return c;
        }
        if (!has("<<SYS>>") && has("{{ bos_token }}") && has("'[INST] ' + message['content'] + ' [/INST]'")) {
            c.family = FAMILY_MISTRAL_LEGACY;
            c.name = "mistral-legacy";
            c.system_ok = false;
            c.eos_space = has("eos_token + ' '");
            return c;
        }
        FAIL("'%s': tokenizer.chat_template uses [INST] in a way vicuna does not know (it looked for %s); pass "
             "--prompt-type instruct, chat or none", printable(path).c_str(), CHAT_TEMPLATE_MARKERS);
    }
    if (has("<|start_header_id|>") && has("<|end_header_id|>")) {
        c.family = FAMILY_LLAMA3;
        c.name = "llama3";
        c.end_of_turn = "<|eot_id|>";
        for (const std::string& lit : jinja_literals(tmpl)) {
            if (lit.compare(0, 23, "Cutting Knowledge Date:") == 0) c.dated_header = lit;
        }
        if (!c.dated_header.empty()) {
            c.name = "llama3.1";
            if (has("strftime_now")) {  // Llama-3.2+: today, as transformers' strftime_now("%d %b %Y")
                char buf[32];
                time_t now = time(nullptr);
                struct tm tm_now;
                localtime_r(&now, &tm_now);
                strftime(buf, sizeof buf, "%d %b %Y", &tm_now);
                c.date = buf;
            } else if (!jinja_assigned_literal(tmpl, "date_string", &c.date)) {
                c.date = "26 Jul 2024";  // Llama-3.1's default
            }
        }
        return c;
    }
    FAIL("'%s': tokenizer.chat_template is not a template vicuna knows (it looked for %s); pass --prompt-type "
         "instruct, chat or none", printable(path).c_str(), CHAT_TEMPLATE_MARKERS);
}

static std::string token_piece(const Tokenizer* t, int id) {
    return id >= 0 && id < t->n_tokens ? std::string(t->pieces[id]) : std::string();
}

// The text apply_chat_template(messages, add_generation_prompt=True) renders for these messages.
static std::string render_chat_template(const ChatTemplate& c, const Tokenizer* t, const std::string* system,
                                        const std::vector<Turn>& history, const std::string& user) {
    std::string bos = c.bos ? token_piece(t, t->bos) : "", eos = token_piece(t, t->eos);
    size_t n = history.size() + 1;
    auto user_of = [&](size_t i) -> const std::string& { return i < history.size() ? history[i].user : user; };
    std::string out = bos;
    switch (c.family) {
    case FAMILY_CHATML:
        if (system || c.has_default_system) out += "<|im_start|>system\n" + (system ? *system : c.default_system) + "<|im_end|>\n";
        for (size_t i = 0; i < n; i++) {
            out += "<|im_start|>user\n" + user_of(i) + "<|im_end|>\n<|im_start|>assistant\n";
            if (i < history.size()) out += history[i].assistant + "<|im_end|>\n";
        }
        break;
    case FAMILY_LLAMA3: {
        auto turn = [&](const char* role, const std::string& text) {  // contents are | trim'med
            out += std::string("<|start_header_id|>") + role + "<|end_header_id|>\n\n" + text + "<|eot_id|>";
        };
        if (!c.dated_header.empty()) {
            turn("system", c.dated_header + "Today Date: " + c.date + "\n\n" + (system ? py_strip(*system) : ""));
        } else if (system) {
            turn("system", py_strip(*system));
        }
        for (size_t i = 0; i < n; i++) {
            turn("user", py_strip(user_of(i)));
            if (i < history.size()) turn("assistant", py_strip(history[i].assistant));
        }
        out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
        break;
    }
    case FAMILY_LLAMA2:
        out.clear();  // bos_token opens every [INST]
        for (size_t i = 0; i < n; i++) {
            std::string content = i == 0 && system ? "<<SYS>>\n" + *system + "\n<</SYS>>\n\n" + user_of(i) : user_of(i);
            out += bos + "[INST] " + (c.strip ? py_strip(content) : content) + " [/INST]";
            if (i < history.size()) {
                const std::string& a = history[i].assistant;
                out += " " + (c.strip ? py_strip(a) : a) + " " + eos;
            }
        }
        break;
    case FAMILY_MISTRAL_LEGACY:
        for (size_t i = 0; i < n; i++) {
            out += "[INST] " + user_of(i) + " [/INST]";
            if (i < history.size()) out += history[i].assistant + eos + (c.eos_space ? " " : "");
        }
        break;
    case FAMILY_MISTRAL_V1:
        for (size_t i = 0; i < n; i++) {
            out += " [INST] " + (i == 0 && system ? *system + "\n\n" : std::string()) + user_of(i) + " [/INST]";
            if (i < history.size()) out += " " + history[i].assistant + eos;
        }
        break;
    case FAMILY_MISTRAL_V3:
    case FAMILY_MISTRAL_V3_TEKKEN: {
        const char* inst = c.family == FAMILY_MISTRAL_V3 ? "[INST] " : "[INST]";
        for (size_t i = 0; i < n; i++) {  // the system text goes before the last question
            out += inst + (i + 1 == n && system ? *system + "\n\n" : std::string()) + user_of(i) + "[/INST]";
            if (i < history.size()) out += " " + py_strip(history[i].assistant) + eos;
        }
        break;
    }
    }
    return out;
}

// ----------------------------------------------------------------------------
// the template a command uses

struct Template {
    PromptType type = PROMPT_NONE;  // NONE, INSTRUCT, CHAT or CHAT_TEMPLATE
    ChatTemplate chat;              // the family, for CHAT_TEMPLATE
    std::string name;               // "none", "instruct", "chat", "chat_template (chatml)"
    std::string source;             // where it came from, for the start-up line
    std::vector<int> end_ids;       // tokens that end an answer besides EOS/EOT (<|im_end|>, <|eot_id|>)
    std::vector<std::string> stops; // text that ends an answer (prompt.STOP_STRINGS)
};

// The template a command renders with. requested: the --prompt-type value, or PROMPT_AUTO for
// the file's own: vicuna.prompt_type when present (a --lora adapter's first: the adapter was
// trained with it), otherwise tokenizer.chat_template.
static Template resolve_template(const GGUFFile* f, const Tokenizer* t, PromptType requested,
                                 std::string_view adapter_prompt_type = {}, const std::string& adapter_path = {}) {
    std::string path = printable(f->path);
    Template tp;
    std::string source = "--prompt-type";
    PromptType type = requested;
    if (type == PROMPT_AUTO) {
        std::string_view key = adapter_prompt_type;
        if (!key.empty()) source = "the adapter's vicuna.prompt_type ('" + printable(adapter_path) + "')";
        else key = gguf_get_str(f, "vicuna.prompt_type", false);
        if (!key.empty()) {
            if (adapter_prompt_type.empty()) source = "vicuna.prompt_type";
            if (key == "instruct") type = PROMPT_INSTRUCT;
            else if (key == "chat") type = PROMPT_CHAT;
            else if (key == "chat_template") type = PROMPT_CHAT_TEMPLATE;
            else {
                FAIL("'%s': vicuna.prompt_type is '%s', not instruct, chat or chat_template; pass --prompt-type",
                     path.c_str(), printable(key).c_str());
            }
        } else if (!gguf_get_str(f, "tokenizer.chat_template", false).empty()) {
            type = PROMPT_CHAT_TEMPLATE;
            source = "";
        } else {
            FAIL("'%s' names no prompt template (neither vicuna.prompt_type nor tokenizer.chat_template); pass "
                 "--prompt-type instruct, chat or none", path.c_str());
        }
    }
    if (type == PROMPT_CHAT_TEMPLATE) {
        std::string_view tmpl = gguf_get_str(f, "tokenizer.chat_template", false);
        if (tmpl.empty()) {
            FAIL("'%s' has no tokenizer.chat_template%s; pass --prompt-type instruct, chat or none", path.c_str(),
                 source != "--prompt-type" ? (" (" + source + " says chat_template)").c_str() : "");
        }
        PromptType ours;
        tp.chat = detect_chat_template(tmpl, f->path, &ours);
        source = source.empty() ? "tokenizer.chat_template" : source + " chat_template: tokenizer.chat_template";
        if (ours != PROMPT_NONE) {
            type = ours;  // prompt.py's template, with prompt.py's layout
        } else {
            tp.type = PROMPT_CHAT_TEMPLATE;
            tp.name = std::string("chat_template (") + tp.chat.name + ")";
            tp.source = source;
            if (*tp.chat.end_of_turn) {
                auto it = t->piece_to_id.find(tp.chat.end_of_turn);
                if (it == t->piece_to_id.end()) {
                    FAIL("'%s': the %s template ends a turn with %s, which is not in the vocabulary", path.c_str(),
                         tp.chat.name, tp.chat.end_of_turn);
                }
                tp.end_ids.push_back(it->second);
            }
            return tp;
        }
    }
    tp.type = type;
    tp.name = type == PROMPT_NONE ? "none" : type == PROMPT_INSTRUCT ? "instruct" : "chat";
    tp.source = source;
    tp.stops = stop_strings(type);
    return tp;
}

// The ids a model is fed: prompt.py's layout for our templates, the rendered chat template
// encoded in one piece (special-token text such as <|im_start|> or <s> becomes its token, and
// no BOS is added beyond what the template writes) for the tokenizer's own.
static std::vector<int> template_prompt_ids(const Template& tp, const Tokenizer* t, const std::string* system,
                                            const std::vector<Turn>& history, const std::string& user) {
    if (tp.type != PROMPT_CHAT_TEMPLATE) return build_prompt_ids(t, tp.type, history, user, system);
    return tokenizer_encode(t, render_chat_template(tp.chat, t, system, history, user), false);
}

// Refuses a system text the template cannot hold, naming the template.
static void check_system(const Template& tp, const std::string* system) {
    if (!system) return;
    if (tp.type == PROMPT_NONE || tp.type == PROMPT_INSTRUCT ||
        (tp.type == PROMPT_CHAT_TEMPLATE && !tp.chat.system_ok)) {
        FAIL("the %s template has no system message; drop --system", tp.name.c_str());
    }
}

// One line for stderr: which template, where from, what ends an answer.
static std::string template_description(const Template& tp, const Tokenizer* t) {
    std::string s = "prompt template " + tp.name + ", from " + tp.source;
    if (tp.type == PROMPT_NONE) return s + "; raw completion";
    if (tp.type == PROMPT_CHAT_TEMPLATE && tp.chat.has_default_system) {
        s += "; default system message '" + printable(tp.chat.default_system, 40) + "'";
    }
    std::vector<int> ids = tp.end_ids;
    for (int id : {t->eos, t->eot}) {
        if (id >= 0 && std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
    }
    std::string ends;
    for (int id : ids) ends += printable(token_piece(t, id)) + ", ";
    for (const std::string& st : tp.stops) ends += "'" + printable(st) + "', ";
    return ends.empty() ? s : s + "; an answer ends at " + ends.substr(0, ends.size() - 2);
}
