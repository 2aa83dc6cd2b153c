"""tools/ against hostile input (issue 10): damaged files, impossible flags, non-finite weights.

Each case builds one damaged input in its own tmp_path from the tiny SentencePiece model of
conftest, runs the tool and requires: exit status 2, exactly one `error: ` line on stderr (the
last) naming the file or flag, no traceback, no output written, and every file that was there
before byte-identical afterwards. The tables run in-process through each tool's main(argv)
(imports once: the whole file stays well under a minute on 2 cores); a few cases also run as real
subprocesses, the way a user meets them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))

import checkpoints  # noqa: E402
import convert_gguf  # noqa: E402
import convert_llama  # noqa: E402
import merge_lora  # noqa: E402
from errors import UserError  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


# --- helpers ---------------------------------------------------------------------------------------


def digest(root) -> dict:
    """{relative path: sha256} of every file under root (symlinks by target name)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path) or not os.path.isfile(path):
                out[rel] = "link:" + os.readlink(path) if os.path.islink(path) else "special"
            else:
                out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def expect_user_error(capsys, main, argv, root, *needles) -> str:
    """main(argv) exits 2 with one `error: ` line holding every needle; nothing under root changed."""
    before = digest(root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])
    assert digest(root) == before, "the failed run changed or left files"
    return errors[0]


def copy_model(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def truncate(path, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])


def edit_json(path, edit) -> None:
    value = json.load(open(path))
    value = edit(value)
    open(path, "w").write(json.dumps(value))


def set_key(key, value):
    def edit(d):
        d[key] = value
        return d
    return edit


def poison(path, key_part: str, value=float("nan"), scale=None) -> None:
    """Rewrite a safetensors file with one tensor (the first whose name holds key_part) poisoned."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    name = next(k for k in sorted(state) if key_part in k)
    if scale is None:
        state[name] = state[name].clone()
        state[name].view(-1)[0] = value
    else:
        state = {k: v * scale for k, v in state.items()}
    save_file(state, str(path))


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def base(tiny_models):
    return tiny_models["sp"]


@pytest.fixture(scope="module")
def adapter(work, base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    lora.save_pretrained(str(work / "lora"))
    return str(work / "lora")


@pytest.fixture(scope="module")
def meta(work, base):
    """The tiny model as Meta's checkpoint: llama/13B/consolidated.0{0,1}.pth + params.json, tokenizer.model."""
    from conftest import _sp_tokenizer_dir
    from test_tools import write_meta_checkpoint

    sp_model = os.path.join(_sp_tokenizer_dir(str(work / "sp-tok")), "tokenizer.model")
    return write_meta_checkpoint(base, sp_model, work / "llama")


# --- merge_lora.py -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["nan", "inf", "-inf", "-1", "0", "0.5", "2XB", "GB", "1e400", "2 G B", "0x10"])
def test_merge_max_shard_size_refused(capsys, tmp_path, base, adapter, size):
    out = tmp_path / "out"
    expect_user_error(capsys, merge_lora.main, ["--model_path", base, "--lora_path", adapter, "--output_path",
                                                str(out), f"--max_shard_size={size}"], tmp_path, "--max_shard_size",
                      repr(size))
    assert not out.exists()


def _adapter_cases():
    """(id, damage(folder), needles): each breaks one file of a copy of the adapter."""
    w = "adapter_model.safetensors"
    c = "adapter_config.json"
    return [
        ("truncated-weights", lambda d: truncate(d / w), [w, "truncated"]),
        ("empty-weights", lambda d: open(d / w, "wb").close(), [w]),
        ("text-weights", lambda d: (d / w).write_text("not tensors"), [w]),
        ("config-list", lambda d: (d / c).write_text("[1, 2]"), [c, "JSON object"]),
        ("config-not-json", lambda d: (d / c).write_text("{\"r\": 4,"), [c, "invalid JSON"]),
        ("config-r-string", lambda d: edit_json(d / c, set_key("r", "eight")), [c, '"r"', "eight"]),
        ("config-r-zero", lambda d: edit_json(d / c, set_key("r", 0)), [c, '"r"']),
        ("config-alpha-string", lambda d: edit_json(d / c, set_key("lora_alpha", "16")), [c, "lora_alpha"]),
        ("config-alpha-pattern-inf", lambda d: edit_json(d / c, set_key("alpha_pattern", {"q_proj": 1e999})),
         [c, '"alpha_pattern" must map module names to positive numbers']),
        ("config-missing", lambda d: os.remove(d / c), [c, "--lora_path"]),
        ("nan-weights", lambda d: poison(d / w, "lora_B"), [w, "NaN", "--learning_rate"]),
        ("inf-weights", lambda d: poison(d / w, "lora_A", float("inf")), [w, "NaN or infinite"]),
    ]


@pytest.mark.parametrize("case", _adapter_cases(), ids=lambda c: c[0])
def test_merge_damaged_adapter(capsys, tmp_path, base, adapter, case):
    _, damage, needles = case
    lora = tmp_path / "lora"
    shutil.copytree(adapter, lora)
    damage(lora)
    out = tmp_path / "out"
    expect_user_error(capsys, merge_lora.main, ["--model_path", base, "--lora_path", str(lora), "--output_path",
                                                str(out)], tmp_path, *needles)
    assert not out.exists()


def _base_cases():
    m = "model.safetensors"
    return [
        ("truncated-weights", lambda d: truncate(d / m), [m, "truncated"]),
        ("empty-weights", lambda d: open(d / m, "wb").close(), [m]),
        ("no-tensors", lambda d: __import__("safetensors.torch").torch.save_file({}, str(d / m)), [m, "no tensors"]),
        ("config-list", lambda d: (d / "config.json").write_text("[]"), ["config.json", "JSON object"]),
        ("config-not-json", lambda d: (d / "config.json").write_text("{oops"), ["config.json", "invalid JSON"]),
        ("index-list", lambda d: (d / "model.safetensors.index.json").write_text("[]"),
         ["model.safetensors.index.json"]),
        ("index-no-weight-map", lambda d: (d / "model.safetensors.index.json").write_text('{"metadata": {}}'),
         ["model.safetensors.index.json", "weight_map"]),
        ("index-outside-folder", lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}})),
         ["model.safetensors.index.json", "weight_map"]),
        ("nan-base-weight", lambda d: poison(d / m, "layers.1.mlp.down_proj"),
         ["model.layers.1.mlp.down_proj.weight", "NaN", "base"]),
    ]


@pytest.mark.parametrize("case", _base_cases(), ids=lambda c: c[0])
def test_merge_damaged_base(capsys, tmp_path, base, adapter, case):
    _, damage, needles = case
    model = tmp_path / "base"
    shutil.copytree(base, model)
    damage(model)
    out = tmp_path / "out"
    expect_user_error(capsys, merge_lora.main, ["--model_path", str(model), "--lora_path", adapter, "--output_path",
                                                str(out)], tmp_path, *needles)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_merge_adapter_passed_as_base(capsys, tmp_path, adapter):
    lora = copy_model(adapter, tmp_path / "lora")
    expect_user_error(capsys, merge_lora.main, ["--model_path", lora, "--lora_path", lora, "--output_path",
                                                str(tmp_path / "out")], tmp_path, lora, "LoRA adapter folder")


def test_merge_refuses_a_result_that_overflows_the_dtype(capsys, tmp_path, base, adapter):
    """A finite adapter whose delta does not fit float16: the merged tensor would be inf."""
    lora = tmp_path / "lora"
    shutil.copytree(adapter, lora)
    poison(lora / "adapter_model.safetensors", "", scale=1e4)  # B @ A grows 1e8-fold
    out = tmp_path / "out"
    expect_user_error(capsys, merge_lora.main, ["--model_path", base, "--lora_path", str(lora), "--output_path",
                                                str(out), "--dtype", "float16"], tmp_path, "--dtype float16",
                      "self_attn", "float32")
    assert not out.exists()
    poison(lora / "adapter_model.safetensors", "", scale=1e20)  # finite weights, B @ A beyond float32
    expect_user_error(capsys, merge_lora.main, ["--model_path", base, "--lora_path", str(lora), "--output_path",
                                                str(out)], tmp_path, str(lora), "self_attn", "NaN or infinite",
                      "--learning_rate")
    assert not out.exists()


@pytest.mark.parametrize("existing", ["file", "folder", "link"])
def test_merge_never_overwrites_the_output(capsys, tmp_path, base, adapter, existing):
    out = tmp_path / "out"
    if existing == "file":
        out.write_text("mine")
    elif existing == "folder":
        out.mkdir()
        (out / "model.safetensors").write_text("mine")
    else:
        os.symlink(tmp_path / "nowhere", out)  # dangling: still something the user made
    expect_user_error(capsys, merge_lora.main, ["--model_path", base, "--lora_path", adapter, "--output_path",
                                                str(out)], tmp_path, "--output_path", "not empty")


def test_merge_writes_into_an_empty_folder_atomically(tmp_path, base, adapter, monkeypatch):
    """An empty --output_path is fine; a failure while writing leaves it empty and no staging folder."""
    out = tmp_path / "out"
    out.mkdir()
    calls = {"n": 0}
    real = checkpoints.write_safetensors

    def failing(path, entries, produce):
        calls["n"] += 1
        real(path, entries, produce)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_safetensors", failing)
    with pytest.raises(UserError, match="No space left"):
        merge_lora.merge(base, adapter, str(out), max_shard_size="100KB")
    assert calls["n"] == 1 and os.listdir(out) == [] and os.listdir(tmp_path) == ["out"]
    monkeypatch.setattr(checkpoints, "write_safetensors", real)
    merge_lora.merge(base, adapter, str(out), max_shard_size="100KB")
    assert "config.json" in os.listdir(out) and os.listdir(tmp_path) == ["out"]


# --- convert_gguf.py ------------------------------------------------------------------------------------


def _gguf_cases():
    m = "model.safetensors"
    return [
        ("truncated-weights", lambda d: truncate(d / m), [m, "truncated"]),
        ("empty-weights", lambda d: open(d / m, "wb").close(), [m]),
        ("no-tensors", lambda d: __import__("safetensors.torch").torch.save_file({}, str(d / m)), [m, "no tensors"]),
        ("config-list", lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json", "JSON object"]),
        ("config-not-json", lambda d: (d / "config.json").write_text("hidden_size: 64"),
         ["config.json", "invalid JSON"]),
        ("config-hidden-string", lambda d: edit_json(d / "config.json", set_key("hidden_size", "64")),
         ["config.json", "hidden_size"]),
        ("config-heads-zero", lambda d: edit_json(d / "config.json", set_key("num_attention_heads", 0)),
         ["config.json", "num_attention_heads"]),
        ("config-heads-uneven", lambda d: edit_json(d / "config.json", set_key("num_key_value_heads", 3)),
         ["config.json", "divide"]),
        ("config-eps-nan", lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')),
         ["config.json", "rms_norm_eps"]),
        ("config-rope-list", lambda d: edit_json(d / "config.json", set_key("rope_scaling", [1, 2])),
         ["config.json", "rope_scaling"]),
        ("config-rope-parameters-string", lambda d: edit_json(d / "config.json", set_key("rope_parameters", "x")),
         ["config.json", "rope_parameters"]),
        ("no-tokenizer", lambda d: [os.remove(d / n) for n in ("tokenizer.json", "tokenizer_config.json")],
         ["--model_path", "tokenizer"]),
        ("tokenizer-not-json", lambda d: (d / "tokenizer.json").write_text("{"), ["tokenizer", "damaged"]),
        ("sentencepiece-damaged", lambda d: (d / "tokenizer.model").write_bytes(b"\x00garbage" * 10),
         ["tokenizer.model", "SentencePiece"]),
        ("nan-weight", lambda d: poison(d / m, "layers.0.self_attn.k_proj"),
         [m, "model.layers.0.self_attn.k_proj.weight", "NaN"]),
    ]


@pytest.mark.parametrize("case", _gguf_cases(), ids=lambda c: c[0])
def test_convert_gguf_damaged_model(capsys, tmp_path, base, case):
    _, damage, needles = case
    model = tmp_path / "model"
    shutil.copytree(base, model)
    damage(model)
    out = tmp_path / "m.gguf"
    expect_user_error(capsys, convert_gguf.main, ["--model_path", str(model), "--outfile", str(out), "--no-verify",
                                                  "--modelfile"], tmp_path, *needles)
    assert not out.exists() and not (tmp_path / "Modelfile").exists()


def test_convert_gguf_refuses_an_adapter_folder(capsys, tmp_path, adapter):
    lora = copy_model(adapter, tmp_path / "lora")
    expect_user_error(capsys, convert_gguf.main, ["--model_path", lora, "--outfile", str(tmp_path / "m.gguf")],
                      tmp_path, lora, "LoRA adapter folder", "merge_lora.py")


def test_convert_gguf_float16_overflow_is_refused(capsys, tmp_path, base):
    model = tmp_path / "model"
    shutil.copytree(base, model)
    poison(model / "model.safetensors", "layers.1.mlp.up_proj", value=1e6)
    expect_user_error(capsys, convert_gguf.main, ["--model_path", str(model), "--outfile", str(tmp_path / "m.gguf"),
                                                  "--outtype", "f16", "--no-verify"], tmp_path,
                      "model.layers.1.mlp.up_proj.weight", "--outtype f32")


def test_convert_gguf_never_overwrites_without_overwrite(capsys, tmp_path, base):
    """The Modelfile is checked before anything is written: an existing one keeps the GGUF from being
    written too; --overwrite replaces both, through temporary names (none left behind)."""
    out = tmp_path / "m.gguf"
    (tmp_path / "Modelfile").write_text("FROM ./my-own.gguf\n")
    expect_user_error(capsys, convert_gguf.main, ["--model_path", base, "--outfile", str(out), "--no-verify",
                                                  "--modelfile"], tmp_path, "Modelfile", "--overwrite")
    assert not out.exists()
    (tmp_path / "dir.gguf").mkdir()
    expect_user_error(capsys, convert_gguf.main, ["--model_path", base, "--outfile", str(tmp_path / "dir.gguf"),
                                                  "--no-verify", "--overwrite"], tmp_path, "dir.gguf", "directory")

    assert convert_gguf.main(["--model_path", base, "--outfile", str(out), "--no-verify"]) == 0  # no Modelfile asked
    assert (tmp_path / "Modelfile").read_text() == "FROM ./my-own.gguf\n"
    assert convert_gguf.main(["--model_path", base, "--outfile", str(out), "--no-verify", "--modelfile",
                              "--overwrite"]) == 0
    assert (tmp_path / "Modelfile").read_text().count("FROM ./m.gguf\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["Modelfile", "dir.gguf", "m.gguf"]


def test_convert_gguf_interrupted_keeps_the_old_files(capsys, tmp_path, base, monkeypatch):
    """Ctrl-C halfway through an --overwrite export: the previous GGUF and Modelfile are intact and
    no temporary file is left."""
    out = tmp_path / "m.gguf"
    assert convert_gguf.main(["--model_path", base, "--outfile", str(out), "--no-verify", "--modelfile"]) == 0
    before = digest(tmp_path)
    calls = {"n": 0}
    real = convert_gguf.tensor_data

    def interrupted(plan, base_, hp):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(plan, base_, hp)

    monkeypatch.setattr(convert_gguf, "tensor_data", interrupted)
    with pytest.raises(SystemExit) as e:
        convert_gguf.main(["--model_path", base, "--outfile", str(out), "--no-verify", "--modelfile", "--overwrite",
                           "--outtype", "f32"])
    assert e.value.code == 130 and calls["n"] == 5
    assert digest(tmp_path) == before


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_verify_fails_on_nan_logits(capsys, tmp_path, monkeypatch, base, outtype):
    """`nan > tol` is false: NaN logits used to pass --verify ("max logit diff nan"). Both sides NaN
    (so top-1 agrees) must fail, for every --outtype."""
    import numpy as np

    from models import load_tokenizer

    vocab = json.load(open(os.path.join(base, "config.json")))["vocab_size"]
    tokenizer = load_tokenizer(base)
    nan = np.full((len(convert_gguf.VERIFY_QUESTIONS), vocab), np.nan, dtype=np.float32)
    monkeypatch.setattr(convert_gguf, "ENGINE", sys.executable)  # "built": engine_* below are used
    monkeypatch.setattr(convert_gguf, "hf_logits", lambda model_dir, prompts: nan)
    monkeypatch.setattr(convert_gguf, "engine_logits", lambda path, prompts, engine: nan.copy())
    monkeypatch.setattr(convert_gguf, "engine_tokenize",
                        lambda path, texts, engine: [list(tokenizer(t)["input_ids"]) for t in texts])
    out = tmp_path / "m.gguf"
    capsys.readouterr()
    assert convert_gguf.main(["--model_path", base, "--outfile", str(out), "--outtype", outtype, "--verify"]) == 1
    captured = capsys.readouterr()
    assert "top-1 agreement 3/3" in captured.out and "max logit diff nan" in captured.out
    assert "NaN or infinite logits" in captured.err and out.exists()  # kept for inspection


# --- convert_llama.py ------------------------------------------------------------------------------------


def _llama_cases():
    shard = "consolidated.00.pth"
    return [
        ("truncated-shard", lambda d: truncate(d / "13B" / shard, 0.6), [shard, "truncated"]),
        ("empty-shard", lambda d: open(d / "13B" / shard, "wb").close(), [shard]),
        ("shard-not-a-dict", lambda d: torch.save(torch.zeros(3), d / "13B" / shard), [shard, "not a dict"]),
        ("params-list", lambda d: (d / "13B" / "params.json").write_text("[64, 2, 4]"),
         ["params.json", "JSON object"]),
        ("params-not-json", lambda d: (d / "13B" / "params.json").write_text("dim=64"),
         ["params.json", "invalid JSON"]),
        ("params-dim-string", lambda d: edit_json(d / "13B" / "params.json", set_key("dim", "64")),
         ["params.json", '"dim"']),
        ("params-eps-negative", lambda d: edit_json(d / "13B" / "params.json", set_key("norm_eps", -1)),
         ["params.json", "norm_eps"]),
        ("params-too-many-layers", lambda d: edit_json(d / "13B" / "params.json", set_key("n_layers", 3)),
         [shard, "layers.2.", "n_layers"]),
        ("params-wrong-heads", lambda d: edit_json(d / "13B" / "params.json", set_key("n_heads", 16)),
         ["13B", "params.json"]),
        ("tokenizer-damaged", lambda d: (d / "tokenizer.model").write_bytes(b"\x08garbage" * 20),
         ["tokenizer.model", "SentencePiece"]),
        ("nan-weight", lambda d: _poison_pth(d / "13B" / "consolidated.01.pth", "layers.1.feed_forward.w2.weight"),
         ["13B", "model.layers.1.mlp.down_proj.weight", "NaN"]),
    ]


def _poison_pth(path, key):
    state = torch.load(path, weights_only=True)
    state[key].view(-1)[3] = float("nan")
    torch.save(state, path)


@pytest.mark.parametrize("case", _llama_cases(), ids=lambda c: c[0])
def test_convert_llama_damaged_checkpoint(capsys, tmp_path, meta, case):
    _, damage, needles = case
    src = tmp_path / "llama"
    shutil.copytree(meta, src)
    damage(src)
    out = tmp_path / "hf"
    expect_user_error(capsys, convert_llama.main, ["--input_dir", str(src), "--model_size", "13B", "--output_dir",
                                                   str(out)], tmp_path, *needles)
    assert not out.exists()


def test_convert_llama_never_overwrites(capsys, tmp_path, meta):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    expect_user_error(capsys, convert_llama.main, ["--input_dir", meta, "--model_size", "13B", "--output_dir",
                                                   str(out)], tmp_path, "--output_dir", "not empty")
    expect_user_error(capsys, convert_llama.main, ["--input_dir", meta, "--model_size", "13B", "--output_dir",
                                                   str(tmp_path / "new"), "--max_shard_size", "nan"], tmp_path,
                      "--max_shard_size")


# --- as a user runs them: real processes ------------------------------------------------------------------


def test_real_processes_print_one_line_and_exit_2(tmp_path, base, adapter, meta):
    """The same errors from real command lines (started together to share the import time)."""
    model = copy_model(base, tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("[1, 2]")
    llama = copy_model(meta, tmp_path / "llama")
    (tmp_path / "llama" / "13B" / "params.json").write_text("[]")
    runs = {
        "tools/merge_lora.py": (["--model_path", base, "--lora_path", adapter, "--output_path",
                                 str(tmp_path / "out"), "--max_shard_size", "nan"], "--max_shard_size 'nan'"),
        "tools/convert_gguf.py": (["--model_path", model, "--outfile", str(tmp_path / "m.gguf")],
                                  os.path.join(model, "config.json")),
        "tools/convert_llama.py": (["--input_dir", llama, "--model_size", "13B", "--output_dir",
                                    str(tmp_path / "hf")], os.path.join(llama, "13B", "params.json")),
    }
    before = digest(tmp_path)
    procs = {tool: subprocess.Popen([sys.executable, tool, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for tool, (args, _) in runs.items()}
    for tool, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (tool, err)
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), (tool, err)
        assert [line for line in err.splitlines() if line.startswith("error: ")] == [err.strip().splitlines()[-1]]
        assert runs[tool][1] in err, (tool, err)
    assert digest(tmp_path) == before
