// prompt.h: the prompt templates, byte-identical to prompt.py (INSTRUCT_NO_INPUT, CHAT_PREAMBLE,
// CHAT_USER, CHAT_TURN_SEPARATOR, STOP_STRINGS), and build_prompt_ids with prompt.py's token
// layout; tests/test_vicuna_cpp.py compares the token ids with prompt.build_prompt_ids.
#pragma once

#include <string>
#include <vector>

#include "tokenizer.h"

enum PromptType { PROMPT_NONE, PROMPT_INSTRUCT, PROMPT_CHAT };

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

// prompt.py's build_prompt_ids: the leading special ids (BOS where the tokenizer adds one), then
// each prompt piece and each answered response (+ EOS) encoded on its own.
static std::vector<int> build_prompt_ids(const Tokenizer* t, PromptType type, const std::vector<Turn>& history,
                                         const std::string& user) {
    std::vector<int> ids;
    if (t->add_bos) ids.push_back(t->bos);
    if (type == PROMPT_NONE) {
        append_ids(&ids, tokenizer_encode(t, user, false));
    } else if (type == PROMPT_INSTRUCT) {
        append_ids(&ids, tokenizer_encode(t, INSTRUCT_NO_INPUT_HEAD + user + INSTRUCT_NO_INPUT_TAIL, false));
    } else {
        for (size_t i = 0; i <= history.size(); i++) {
            const std::string& u = i < history.size() ? history[i].user : user;
            std::string prompt = (i == 0 ? CHAT_PREAMBLE : CHAT_TURN_SEPARATOR) + (CHAT_USER_HEAD + u) + CHAT_USER_TAIL;
            append_ids(&ids, tokenizer_encode(t, prompt, false));
            if (i < history.size()) {
                append_ids(&ids, tokenizer_encode(t, history[i].assistant, false));
                if (t->eos >= 0) ids.push_back(t->eos);
            }
        }
    }
    return ids;
}
