"""tools/eval_ppl.py: perplexity on a text (llama.cpp's chunks) and on a data file's responses.

Golden values come from outside the tool: plain torch cross-entropy over the model's logits on ids
the test tokenizes itself, the trainer's own eval_loss, a merged model, and vicuna.cpp's
`vicuna perplexity` on an f32 GGUF export of the same weights.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import NEEDS_CPP, ROOT, make_tiny_model, run_script, train_args, write_jsonl

sys.path.insert(0, os.path.join(ROOT, "tools"))

import eval_ppl  # noqa: E402

EN = os.path.join(ROOT, "sample", "ppl", "en.txt")
ZH = os.path.join(ROOT, "sample", "ppl", "zh.txt")


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hand_text_ppl(model_dir: str, text_path: str, ctx: int, chunks: int) -> tuple[float, int]:
    """llama.cpp's method written out: tokenizer(text) with its own special tokens, chunks of ctx,
    BOS first in each chunk when the tokenizer adds one, the second half scored."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(text_path, encoding="utf-8") as f:
        ids = tok(f.read())["input_ids"]
    adds_bos = tok.bos_token_id is not None and ids[0] == tok.bos_token_id
    model = load(model_dir)
    losses = []
    for c in range(chunks):
        chunk = torch.tensor(ids[c * ctx:(c + 1) * ctx])
        if adds_bos:
            chunk[0] = tok.bos_token_id
        with torch.no_grad():
            logits = model(chunk[None]).logits[0]
        losses.append(F.cross_entropy(logits[ctx // 2:ctx - 1].double(), chunk[ctx // 2 + 1:], reduction="none"))
    nll = torch.cat(losses)
    return math.exp(float(nll.mean())), nll.numel()


def hand_response_loss(model_dir: str, data_path: str, prompt_type="instruct", cutoff_len=256) -> tuple[float, int]:
    """Mean cross-entropy over encode_example's supervised labels, one example at a time, no padding."""
    from data import load_conversations
    from models import load_tokenizer
    from prompt import IGNORE_INDEX, encode_example

    tok = load_tokenizer(model_dir)
    model = load(model_dir)
    total, count = 0.0, 0
    for conv in load_conversations(data_path)[1]:
        ex, _ = encode_example(prompt_type, conv, tok, cutoff_len)
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"])
        with torch.no_grad():
            logits = model(ids).logits[0]
        total += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels[1:] != IGNORE_INDEX).sum())
    return total / count, count


def cli_error(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        eval_ppl.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def make_adapter(base_dir, out_dir, seed=1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(load(base_dir), lora)
    model.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return make_adapter(tiny_model, tmp_path_factory.mktemp("eval-ppl") / "lora")


# --- text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,text", [("bpe", EN), ("sp", ZH)])
def test_text_ppl_equals_plain_torch(kind, text, tiny_models, capsys, tmp_path):
    out = tmp_path / "r.json"
    [r] = eval_ppl.main(["--model_path", tiny_models[kind], "--text", text, "--ctx", "64", "--chunks", "3",
                         "--json", str(out)])
    ppl, n = hand_text_ppl(tiny_models[kind], text, 64, 3)
    assert r["tokens"] == n == 3 * 31 and r["chunks"] == 3
    assert r["ppl"] == pytest.approx(ppl, rel=1e-6)
    line = capsys.readouterr().out.strip()
    assert line == f"{tiny_models[kind]}: ppl {ppl:.4f} over 93 tokens (3 chunks of 64)"
    saved = json.loads(out.read_text())
    assert saved["results"][0]["ppl"] == r["ppl"] and saved["text"] == text


# `vicuna perplexity -m SmolLM2-135M-Instruct.f32.gguf -f sample/ppl/en.txt -c 256 --chunks 1` (the f32
# export of tools/convert_gguf.py); 7 chunks of 512: 19.7291 in both engines.
EMBEDDED_EN_256 = 25.0248


def test_embedded_model_one_chunk(embedded_path, capsys):
    """The default model, as a user runs it: one chunk of 256 tokens of held-out English, the same
    number as vicuna.cpp's on its f32 GGUF (a golden value; the chunk loop itself is checked against
    plain torch above)."""
    [r] = eval_ppl.main(["--text", EN, "--ctx", "256", "--chunks", "1"])
    assert r["tokens"] == 127 and r["chunks"] == 1
    assert r["ppl"] == pytest.approx(EMBEDDED_EN_256, rel=1e-3)
    assert capsys.readouterr().out.startswith("SmolLM2-135M-Instruct: ppl 25.02")


def test_bitsandbytes_rows_run_on_cpu(tiny_model):
    argv = ["--model_path", tiny_model, "--text", EN, "--ctx", "64", "--chunks", "2"]
    [base] = eval_ppl.main(argv)
    for quant in ("8bit", "4bit"):
        [q] = eval_ppl.main(argv + ["--quant", quant])
        assert q["quant"] == quant and q["tokens"] == base["tokens"]
        assert math.isfinite(q["ppl"]) and q["ppl"] != base["ppl"]
        assert q["ppl"] == pytest.approx(base["ppl"], rel=0.05)  # quantized, not broken


def test_adapter_differs_from_base_and_equals_merged(tiny_model, adapter, tmp_path, capsys):
    import merge_lora

    merged = merge_lora.merge(tiny_model, adapter, str(tmp_path / "merged"))
    base, with_adapter = eval_ppl.main(["--model_path", tiny_model, "--lora_path", adapter, "--compare_base",
                                        "--text", EN, "--ctx", "64", "--chunks", "2"])
    assert base["lora_path"] is None and with_adapter["lora_path"] == adapter
    assert abs(with_adapter["ppl"] / base["ppl"] - 1) > 1e-3
    [alone] = eval_ppl.main(["--model_path", tiny_model, "--lora_path", adapter, "--text", EN, "--ctx", "64",
                             "--chunks", "2"])
    [m] = eval_ppl.main(["--model_path", merged, "--text", EN, "--ctx", "64", "--chunks", "2"])
    [plain] = eval_ppl.main(["--model_path", tiny_model, "--text", EN, "--ctx", "64", "--chunks", "2"])
    assert base["ppl"] == pytest.approx(plain["ppl"], rel=1e-9)  # the adapter switched off is the base
    assert alone["ppl"] == pytest.approx(with_adapter["ppl"], rel=1e-9)
    assert m["ppl"] == pytest.approx(with_adapter["ppl"], rel=1e-5)
    assert "adapter vs base: ppl " in capsys.readouterr().out


@NEEDS_CPP
@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_same_ppl_as_vicuna_perplexity_on_the_f32_gguf(kind, tiny_models, vicuna, tmp_path):
    """The f32 GGUF export scored by `vicuna perplexity` (through --engine vicuna, which runs it)
    and the HF folder scored by transformers: the same chunks and ids, the same number."""
    import convert_gguf

    gguf = str(tmp_path / f"{kind}.f32.gguf")
    assert convert_gguf.main(["--model_path", tiny_models[kind], "--outfile", gguf, "--outtype", "f32",
                              "--no-verify"]) == 0
    text = EN if kind == "bpe" else ZH
    [hf] = eval_ppl.main(["--model_path", tiny_models[kind], "--text", text, "--ctx", "128", "--chunks", "3"])
    [cpp] = eval_ppl.main(["--model_path", gguf, "--engine", "vicuna", "--text", text, "--ctx", "128",
                           "--chunks", "3"])
    assert cpp["tokens"] == hf["tokens"] == 3 * 63 and cpp["chunks"] == 3
    assert cpp["ppl"] == pytest.approx(hf["ppl"], rel=1e-3)


@NEEDS_CPP
def test_adapter_same_ppl_in_vicuna_cpp(tiny_model, adapter, vicuna, tmp_path):
    """Base and adapter in one command, in both engines: the GGUF LoRA on the f32 GGUF base in
    vicuna.cpp, the peft adapter on the HF folder in transformers."""
    import convert_gguf

    base_gguf, lora_gguf = str(tmp_path / "base.f32.gguf"), str(tmp_path / "lora.f32.gguf")
    assert convert_gguf.main(["--model_path", tiny_model, "--outfile", base_gguf, "--outtype", "f32",
                              "--no-verify"]) == 0
    assert convert_gguf.main(["--lora_path", adapter, "--model_path", tiny_model, "--outfile", lora_gguf,
                              "--outtype", "f32", "--no-verify"]) == 0
    argv = ["--compare_base", "--text", EN, "--ctx", "128", "--chunks", "2"]
    hf = eval_ppl.main(["--model_path", tiny_model, "--lora_path", adapter] + argv)
    cpp = eval_ppl.main(["--model_path", base_gguf, "--engine", "vicuna", "--lora_path", lora_gguf] + argv)
    for h, c in zip(hf, cpp):
        assert c["ppl"] == pytest.approx(h["ppl"], rel=1e-3)
    assert abs(cpp[1]["ppl"] / cpp[0]["ppl"] - 1) > 1e-3  # the adapter did something


# --- data: responses only ------------------------------------------------------------------------


def test_data_ppl_equals_hand_computation_over_encode_example(tiny_model, instruct_file, capsys):
    [r] = eval_ppl.main(["--model_path", tiny_model, "--data_path", instruct_file, "--batch_size", "3"])
    loss, n = hand_response_loss(tiny_model, instruct_file)
    assert r["tokens"] == n and r["examples"] == 8 and r["prompt_type"] == "instruct" and r["cutoff_len"] == 256
    assert r["mean_loss"] == pytest.approx(loss, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert f"ppl {r['ppl']:.4f} over {n} response tokens of 8 examples" in capsys.readouterr().out


def test_data_ppl_equals_the_trainers_eval_loss(tiny_model, instruct_file, tmp_path):
    """finetune.py with a held-out set evaluated after its last step, in one batch: its eval_loss is
    the adapter's mean response loss on those records, which eval_ppl must reproduce."""
    from data import load_conversations, train_test_split

    out = str(tmp_path / "lora")
    import finetune

    finetune.main(train_args(instruct_file, out, tiny_model, "--test_size", "4", "--micro_batch_size", "4",
                             "--eval_steps", "4", "--save_steps", "4"))
    with open(os.path.join(out, "checkpoint-4", "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    eval_loss = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e][-1]
    with open(instruct_file, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    _, test = train_test_split(list(range(len(records))), 4, 42, instruct_file)
    held = write_jsonl(tmp_path / "held.jsonl", [records[i] for i in test])
    assert len(load_conversations(held)[1]) == 4
    [r] = eval_ppl.main(["--model_path", tiny_model, "--lora_path", out, "--data_path", held])
    assert r["mean_loss"] == pytest.approx(eval_loss, rel=1e-4)


# --- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors_and_write_nothing(tiny_model, tiny_models, instruct_file, tmp_path, capsys):
    """Missing, empty, short or non-UTF-8 text, a data file with a bad line, an adapter of another
    base, flags that do not go together: one `error:` line, exit 2, no --json written."""
    out = tmp_path / "r.json"
    common = ["--model_path", tiny_model, "--json", str(out)]
    assert "no such file" in cli_error(capsys, common + ["--text", str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("\n \n")
    assert "empty" in cli_error(capsys, common + ["--text", str(tmp_path / "empty.txt")])
    (tmp_path / "short.txt").write_text("A few words only.")
    err = cli_error(capsys, common + ["--text", str(tmp_path / "short.txt")])
    assert "fewer than one chunk of --ctx 512" in err and "smaller --ctx" in err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "not UTF-8" in cli_error(capsys, common + ["--text", str(tmp_path / "latin1.txt")])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, '{"instruction": "c", '])
    assert f"{bad}:2: invalid JSON" in cli_error(capsys, common + ["--data_path", bad])
    # an adapter trained on another base (hidden 32, not 64)
    other = make_tiny_model(str(tmp_path / "other"), tiny_models["sp"], hidden_size=32)
    wrong = make_adapter(other, tmp_path / "wrong-lora")
    err = cli_error(capsys, common + ["--lora_path", wrong, "--text", EN, "--ctx", "64"])
    assert "does not fit base model" in err
    assert "--lora_path" in cli_error(capsys, common + ["--compare_base", "--text", EN])
    assert "--ctx must be at least 4" in cli_error(capsys, common + ["--text", EN, "--ctx", "2"])
    assert "--chunks applies to --text" in cli_error(capsys, common + ["--data_path", instruct_file, "--chunks", "1"])
    assert "no folder" in cli_error(capsys, ["--model_path", tiny_model, "--text", EN,
                                             "--json", str(tmp_path / "nowhere" / "r.json")])
    assert "--engine vicuna needs a .gguf" in cli_error(capsys, common + ["--engine", "vicuna", "--text", EN])
    assert not out.exists()


def test_cli_error_exit_2_no_traceback(tmp_path):
    proc = run_script("tools/eval_ppl.py", "--text", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --text {tmp_path / 'missing.txt'}: no such file"]
    assert proc.stdout == ""
