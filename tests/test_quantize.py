"""tools/quantize.py (issue 15): GPTQ and AWQ through llm-compressor, calibrated on our data, and
the round-to-nearest baseline (--method rtn).

The quantizing tests need the optional library (`pip install --no-deps -r requirements-quant.txt`) and are
skipped without it; the bad-input tests run everywhere (every check comes before the library is
imported). The method's point is asserted, not just that it runs: on records the calibration did
not see, a GPTQ model's logits are closer to the float model's than those of a round-to-nearest
model with the same bits, group size and quantizer (--method rtn: llm-compressor's
QuantizationModifier).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

from conftest import INSTRUCT_RECORDS, ROOT, write_jsonl

sys.path.insert(0, os.path.join(ROOT, "tools"))

import quantize  # noqa: E402

HAVE_LIBRARY = all(importlib.util.find_spec(m) for m in ("llmcompressor", "compressed_tensors"))
INSTALL = "pip install --no-deps -r requirements-quant.txt"
needs_library = pytest.mark.skipif(not HAVE_LIBRARY, reason=f"needs llm-compressor: {INSTALL}")

# Held-out text for the logit comparison (none of it is in the calibration file).
HELDOUT = [
    {"instruction": "Describe a llama in one sentence.", "input": "",
     "output": "A llama is a woolly animal of the Andes."},
    {"instruction": "把这句话翻译成英文。", "input": "今天天气很好。",
     "output": "The weather is nice today."},
    {"instruction": "List three fruits.", "input": "", "output": "Apple, banana and cherry."},
]


def tiny_args(model, out, calib, *extra, method=None):
    """The tiny model's arguments; --method rtn takes no calibration flags."""
    if method == "rtn":
        return ["--model_path", model, "--output_path", out, "--group_size", "32", "--method", "rtn", *extra]
    return ["--model_path", model, "--output_path", out, "--calib_data", calib, "--group_size", "32",
            "--nsamples", "8", "--seqlen", "64", *extra, *(["--method", method] if method else [])]


def run_main(argv):
    quantize.main(argv)


def heldout_logits(model_dir: str, tokenizer_dir: str) -> torch.Tensor:
    from models import load_model, load_tokenizer
    from prompt import Conversation, render, tokenize_pieces

    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_model(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for r in HELDOUT:
            conv = Conversation(turns=[(r["instruction"], r["output"])], input=r["input"])
            ids, _ = tokenize_pieces(render("instruct", conv, tokenizer), tokenizer)
            out.append(model(torch.tensor([ids])).logits[0].float())
    return torch.cat(out)


def rtn_model(model_dir: str, out: str, bits: int, group_size: int) -> str:
    """The same scheme as the tool's GPTQ, by round-to-nearest (no calibration): --method rtn."""
    run_main(["--method", "rtn", "--model_path", model_dir, "--output_path", out, "--bits", str(bits),
              "--group_size", str(group_size)])
    return out


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("calib") / "calib.jsonl", INSTRUCT_RECORDS)


@pytest.fixture(scope="module")
def gptq_tiny(tiny_model, calib, tmp_path_factory):
    if not HAVE_LIBRARY:
        pytest.skip(f"needs llm-compressor: {INSTALL}")
    out = str(tmp_path_factory.mktemp("q") / "gptq")
    run_main(tiny_args(tiny_model, out, calib, "--bits", "4"))
    return out


# --- quantizing ------------------------------------------------------------------------------------


@needs_library
def test_gptq_folder_layout(gptq_tiny, tiny_model):
    config = json.load(open(os.path.join(gptq_tiny, "config.json")))
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    weights = q["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)
    assert weights["actorder"] == "weight"  # act-order by default (static: no g_idx)
    assert q["ignore"] == ["lm_head"]
    training = json.load(open(os.path.join(gptq_tiny, "training_config.json")))
    assert training["prompt_type"] == "instruct"
    assert training["quantized"]["method"] == "gptq" and training["quantized"]["nsamples"] == 8
    assert training["quantized"]["desc_act"] is True and training["quantized"]["pack"] is False
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert os.path.isfile(os.path.join(gptq_tiny, name))
    # packed int32 weights, not float ones
    from safetensors import safe_open

    with safe_open(os.path.join(gptq_tiny, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.weight_packed" in keys
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed").dtype == torch.int32
    assert not [n for n in os.listdir(os.path.dirname(gptq_tiny)) if n.startswith(".")], "staging folder left behind"


@needs_library
def test_gptq_loads_generates_and_beats_round_to_nearest(gptq_tiny, tiny_model, tmp_path):
    """Loads through our loader (transformers + compressed-tensors), generates, and its logits on
    held-out records are closer to the float model's than a round-to-nearest model's."""
    from models import load_for_inference

    model, tokenizer = load_for_inference(gptq_tiny)
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5

    ref = heldout_logits(tiny_model, tiny_model)
    gptq = heldout_logits(gptq_tiny, tiny_model)
    rtn = heldout_logits(rtn_model(tiny_model, str(tmp_path / "rtn"), 4, 32), tiny_model)
    err_gptq, err_rtn = (gptq - ref).pow(2).mean().item(), (rtn - ref).pow(2).mean().item()
    assert err_rtn > 0 and err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)


@needs_library
def test_generate_script_reads_quantized_folder(gptq_tiny):
    from conftest import run_script

    r = run_script("generate.py", "--model_path", gptq_tiny, "--instruction", "Say hello.",
                   "--max_new_tokens", "4", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"prompt type 'instruct', as {gptq_tiny} was trained" in r.stderr  # its training_config.json


@needs_library
def test_rtn_tiny(tiny_model, tmp_path):
    """--method rtn: the same folder (scheme, packed weights, tokenizer) with no calibration, and it loads."""
    out = rtn_model(tiny_model, str(tmp_path / "rtn"), 3, 32)
    weights = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["config_groups"]["group_0"][
        "weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (3, 32, True)
    quantized = json.load(open(os.path.join(out, "training_config.json")))["quantized"]
    assert quantized["method"] == "rtn" and "calib_data" not in quantized and "nsamples" not in quantized
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    from models import load_for_inference

    model, tokenizer = load_for_inference(out)
    model.generate(tokenizer("Hi", return_tensors="pt").input_ids, max_new_tokens=3, do_sample=False)


@needs_library
@pytest.mark.slow
def test_awq_tiny(tiny_model, calib, tmp_path):
    out = str(tmp_path / "awq")
    run_main(tiny_args(tiny_model, out, calib, "--method", "awq", "--nsamples", "4", "--seqlen", "32"))
    q = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert q["config_groups"]["group_0"]["weights"]["symmetric"] is True  # zero points do not load (tools/quantize.py)
    from models import load_for_inference

    model, tokenizer = load_for_inference(out)
    model.generate(tokenizer("Hi", return_tensors="pt").input_ids, max_new_tokens=3, do_sample=False)


@needs_library
@pytest.mark.slow
def test_gptq_3bit_natural_order_packed(tiny_model, calib, tmp_path):
    out = str(tmp_path / "g3")
    run_main(tiny_args(tiny_model, out, calib, "--bits", "3", "--no-desc_act", "--pack"))
    q = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["actorder"]) == (3, None)
    made = json.load(open(os.path.join(out, "training_config.json")))["quantized"]
    assert made["pack"] is True and made["desc_act"] is False and made["calib_tokens"] <= 8 * 64
    ref, got = heldout_logits(tiny_model, tiny_model), heldout_logits(out, tiny_model)
    assert torch.isfinite(got).all() and (got - ref).pow(2).mean() < 0.01


@needs_library
@pytest.mark.slow
def test_gptq_embedded_model(tmp_path):
    """The embedded SmolLM2-135M (hidden 576: group size 64 chosen) with a few samples; 4-9 minutes on 2 cores."""
    out = str(tmp_path / "smol")
    run_main(["--output_path", out, "--nsamples", "4", "--seqlen", "64"])  # defaults: embedded model, sample/
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"]["config_groups"]["group_0"][
        "weights"]["group_size"] == 64
    from models import load_for_inference

    model, tokenizer = load_for_inference(out)
    model.generate(tokenizer("Hi", return_tensors="pt").input_ids, max_new_tokens=3, do_sample=False)


def test_packed_calibration_is_the_records_back_to_back(bpe_tokenizer, tmp_path):
    """--pack: the rendered records (each with its EOS, in the seeded order) cut into --seqlen
    sequences; unpacked, one record per sequence cut to --seqlen."""
    import random

    from data import load_conversations
    from eval_data import calibration_ids
    from prompt import render, tokenize_pieces

    convs = load_conversations(write_jsonl(tmp_path / "calib.jsonl", INSTRUCT_RECORDS * 4))[1]
    order = list(range(len(convs)))
    random.Random(7).shuffle(order)
    whole = [tokenize_pieces(render("instruct", convs[i], bpe_tokenizer), bpe_tokenizer)[0] for i in order]
    assert all(ids[-1] == bpe_tokenizer.eos_token_id for ids in whole)
    stream = [t for ids in whole for t in ids]

    packed = calibration_ids(convs, "calib.jsonl", bpe_tokenizer, "instruct", 1000, 48, seed=7, pack=True)
    assert [len(s) for s in packed[:-1]] == [48] * (len(packed) - 1) and 0 < len(packed[-1]) <= 48
    assert [t for s in packed for t in s] == stream
    few = calibration_ids(convs, "calib.jsonl", bpe_tokenizer, "instruct", 3, 48, seed=7, pack=True)
    assert few == packed[:3]
    one_each = calibration_ids(convs, "calib.jsonl", bpe_tokenizer, "instruct", 5, 48, seed=7)
    assert one_each == [ids[:48] for ids in whole[:5]]


# --- bad inputs: one line, nothing written ---------------------------------------------------------


def expect_error(capsys, argv, *needles, out=None):
    parent = os.path.dirname(out) if out else None
    before = sorted(os.listdir(parent)) if parent else None
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    if parent:
        assert sorted(os.listdir(parent)) == before, "something was written"


@pytest.mark.parametrize("method", quantize.METHODS)
def test_adapter_folder_refused(capsys, tmp_path, calib, method):
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}')
    out = str(tmp_path / "out")
    expect_error(capsys, tiny_args(str(adapter), out, calib, method=method), "adapter folder", "merge_lora", out=out)


@pytest.mark.parametrize("method,bits", [("awq", 3), ("awq", 8), ("gptq", 5), ("gptq", 16), ("rtn", 5), ("rtn", 1)])
def test_unsupported_bits(capsys, tmp_path, tiny_model, calib, method, bits):
    out = str(tmp_path / "out")
    expect_error(capsys, tiny_args(tiny_model, out, calib, "--bits", str(bits), method=method),
                 f"--bits {bits}", method, out=out)


@pytest.mark.parametrize("flags", [["--calib_data", "x.jsonl"], ["--nsamples", "8"], ["--seqlen", "64"],
                                   ["--prompt_type", "instruct"], ["--desc_act"], ["--no-desc_act"],
                                   ["--pack"]])
def test_rtn_takes_no_calibration(capsys, tmp_path, tiny_model, flags):
    out = str(tmp_path / "out")
    expect_error(capsys, tiny_args(tiny_model, out, None, *flags, method="rtn"), flags[0], "rtn", out=out)


def test_missing_calibration_file(capsys, tmp_path, tiny_model):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "nope.jsonl")
    expect_error(capsys, tiny_args(tiny_model, out, missing), "nope.jsonl", "no such file", out=out)


@pytest.mark.parametrize("method", quantize.METHODS)
def test_output_folder_with_files(capsys, tmp_path, tiny_model, calib, method):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    expect_error(capsys, tiny_args(tiny_model, str(out), calib, method=method), "--output_path", "not empty")
    assert os.listdir(out) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("method", quantize.METHODS)
def test_group_size_must_divide(capsys, tmp_path, tiny_model, calib, method):
    out = str(tmp_path / "out")
    argv = tiny_args(tiny_model, out, calib, method=method)
    argv[argv.index("--group_size") + 1] = "48"
    expect_error(capsys, argv, "--group_size 48", "64", "pass --group_size 64", out=out)


@pytest.mark.parametrize("flag", ["--desc_act", "--no-desc_act"])
def test_desc_act_is_gptq_only(capsys, tmp_path, tiny_model, calib, flag):
    out = str(tmp_path / "out")
    expect_error(capsys, tiny_args(tiny_model, out, calib, "--method", "awq", flag), flag, out=out)


def test_bad_calibration_record(capsys, tmp_path, tiny_model):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": 3, "output": "y"}])
    out = str(tmp_path / "out")
    expect_error(capsys, tiny_args(tiny_model, out, bad), "bad.jsonl", "bad.jsonl:2", out=out)


@pytest.mark.parametrize("method", quantize.METHODS)
def test_already_quantized_model_refused(capsys, tmp_path, tiny_model, calib, method):
    import shutil

    q = tmp_path / "q"
    shutil.copytree(tiny_model, q)
    config = json.load(open(q / "config.json"))
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (q / "config.json").write_text(json.dumps(config))
    out = str(tmp_path / "out")
    expect_error(capsys, tiny_args(str(q), out, calib, method=method), "already quantized", out=out)


def test_training_on_compressed_base_is_one_line(tmp_path, tiny_model, instruct_file):
    """peft has no LoRA layer for compressed-tensors' packed weights: refused before any output."""
    import shutil

    from conftest import run_script, train_args

    q = tmp_path / "q"
    shutil.copytree(tiny_model, q)
    config = json.load(open(q / "config.json"))
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (q / "config.json").write_text(json.dumps(config))
    out = tmp_path / "lora"
    r = run_script("finetune.py", *train_args(instruct_file, str(out), str(q)), timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr[-2000:]
    assert "compressed-tensors" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.skipif(HAVE_LIBRARY, reason="the library is installed")
@pytest.mark.parametrize("method", quantize.METHODS)
def test_missing_library_is_one_line(capsys, tmp_path, tiny_model, calib, method):
    out = str(tmp_path / "out")
    expect_error(capsys, tiny_args(tiny_model, out, calib, method=method), INSTALL, out=out)


@needs_library
def test_api_server_serves_quantized_folder(gptq_tiny):
    """serve.py on a GPTQ folder through the official openai client: the folder's own template
    (training_config.json says instruct, though its tokenizer has a chat template) builds the
    prompt, and a completion is the quantized model's greedy continuation."""
    import openai

    from prompt import Conversation, build_prompt_ids
    from serve import Engine, build_app, load_served
    from test_serve import Running

    model, tokenizer, served = load_served(gptq_tiny, [], base_name="gptq")
    assert tokenizer.chat_template and served["gptq"].prompt_type == "instruct"
    engine = Engine(model, tokenizer, served, max_queue=4)
    running = Running(engine, build_app(engine, api_key=None))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        chat = client.chat.completions.create(model="gptq", messages=[{"role": "user", "content": "Say hi."}],
                                              temperature=0, max_tokens=3)
        assert chat.usage.prompt_tokens == len(build_prompt_ids("instruct", Conversation(turns=[("Say hi.", None)]),
                                                                 tokenizer))
        out = client.completions.create(model="gptq", prompt="Once upon a time", max_tokens=6, temperature=0,
                                        extra_body={"min_tokens": 6})
        ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
        expected = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        assert out.usage.completion_tokens == 6
        assert out.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    finally:
        running.close()
