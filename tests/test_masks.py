"""Golden label masks, written by `finetune.py --inspect_data` without loading weights."""

import json

import finetune
import finetune_chat
from conftest import write_jsonl
from prompt import IGNORE_INDEX

M = IGNORE_INDEX

# SmolLM2's byte-level BPE; EOS is <|im_end|> (id 2), no BOS is added.
GOLDEN_INSTRUCT_IDS = [19798, 314, 354, 5785, 338, 6601, 253, 3856, 30, 9517, 253, 2426, 338, 13674, 32873,
                       260, 3116, 30, 198, 198, 3757, 20880, 42, 198, 26843, 198, 198, 3757, 14212, 42, 198,
                       19556, 2]
GOLDEN_INSTRUCT_LABELS = [M] * 31 + [19556, 2]
GOLDEN_CHAT_IDS = [504, 1695, 314, 253, 6634, 826, 354, 5646, 11173, 1217, 20108, 284, 253, 1205, 2914, 1217,
                   11122, 30, 378, 11173, 314, 11339, 28, 22477, 284, 26310, 288, 2988, 2029, 282, 2914, 30,
                   198, 198, 11126, 42, 18645, 250, 48392, 138, 198, 198, 9519, 9531, 42, 176, 241, 118, 2,
                   198, 198, 11126, 42, 33, 27, 33, 47, 198, 198, 9519, 9531, 42, 34, 2]
GOLDEN_CHAT_LABELS = [M] * 45 + [176, 241, 118, 2] + [M] * 13 + [34, 2]


def inspect(tmp_path, records, model, *extra, entry=finetune):
    data = write_jsonl(tmp_path / "d.jsonl", records)
    out = tmp_path / "inspect.jsonl"
    entry.main(["--data_path", data, "--model_path", model, "--inspect_data", str(out), *extra])
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_golden_instruct_mask(tmp_path, tiny_models):
    [ex] = inspect(tmp_path, [{"instruction": "Hi", "input": "", "output": "Hello"}], tiny_models["bpe"])
    assert ex == {"where": f"{tmp_path / 'd.jsonl'}:1", "length": 33, "cut": False,
                  "input_ids": GOLDEN_INSTRUCT_IDS, "labels": GOLDEN_INSTRUCT_LABELS}


def test_golden_chat_mask_every_assistant_turn(tmp_path, tiny_models):
    rec = {"input": ["你好", "1+1?"], "output": ["嗨", "2"]}
    [ex] = inspect(tmp_path, [rec], tiny_models["bpe"], entry=finetune_chat)
    assert ex == {"where": f"{tmp_path / 'd.jsonl'}:1", "length": len(GOLDEN_CHAT_IDS), "cut": False,
                  "input_ids": GOLDEN_CHAT_IDS, "labels": GOLDEN_CHAT_LABELS}


def test_chat_last_turn_only(tmp_path, tiny_models):
    rec = {"input": ["你好", "1+1?"], "output": ["嗨", "2"]}
    [ex] = inspect(tmp_path, [rec], tiny_models["bpe"], "--train_on", "last", entry=finetune_chat)
    assert ex["input_ids"] == GOLDEN_CHAT_IDS
    assert ex["labels"] == [M] * 62 + [34, 2]


def test_sentencepiece_mask_has_bos_and_eos(tmp_path, tiny_models, sp_tokenizer):
    [ex] = inspect(tmp_path, [{"instruction": "Hi", "input": "ctx", "output": "你好 world"}], tiny_models["sp"])
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids[0] == sp_tokenizer.bos_token_id == 1 and ids[-1] == sp_tokenizer.eos_token_id == 2
    n_prompt = labels.index(next(l for l in labels if l != M))
    assert labels[:n_prompt] == [M] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert sp_tokenizer.decode(ids[1:n_prompt]).endswith("### Input:\nctx\n\n### Response:\n")
    assert sp_tokenizer.decode(labels[n_prompt:], skip_special_tokens=True) == "你好 world"


def test_truncation_drops_examples_without_supervised_tokens(tmp_path, tiny_models, bpe_tokenizer, caplog):
    from prompt import Conversation, render, tokenize_pieces

    records = [{"instruction": "short", "output": "ok"},
               {"instruction": "long " * 200, "output": "never seen"}]
    kept, dropped = inspect(tmp_path, records, tiny_models["bpe"], "--cutoff_len", "64")
    assert len(kept["input_ids"]) == kept["length"] <= 64 and kept["cut"] is False
    whole, _ = tokenize_pieces(render("instruct", Conversation([("long " * 200, "never seen")])), bpe_tokenizer)
    assert dropped == {"where": f"{tmp_path / 'd.jsonl'}:2", "length": len(whole), "dropped": True}
    assert len(whole) > 200
    assert "1 dropped" in caplog.text
    # A response cut short keeps its supervised prefix (and loses its EOS).
    [ex] = inspect(tmp_path / "..", [{"instruction": "q", "output": "word " * 100}], tiny_models["bpe"],
                   "--cutoff_len", "40")
    assert len(ex["input_ids"]) == 40 and ex["labels"][-1] != M and 2 not in ex["labels"]
    assert ex["cut"] is True and ex["length"] > 100


def test_chat_template_prompt_type_masks(tmp_path, tiny_models, bpe_tokenizer):
    [ex] = inspect(tmp_path, [{"messages": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Yo"}]}],
                   tiny_models["bpe"], "--prompt_type", "chat_template")
    supervised = [t for t in ex["labels"] if t != M]
    assert bpe_tokenizer.decode(supervised) == "Yo<|im_end|>\n"
    assert bpe_tokenizer.decode(ex["input_ids"]).endswith("<|im_start|>assistant\nYo<|im_end|>\n")
