"""LoRA adapters as GGUF files: tools/convert_gguf.py --lora_path and `vicuna ... --lora`.

- The adapter file is what llama.cpp's loader expects (read back with gguf-py's GGUFReader):
  general.type=adapter, adapter.type=lora, adapter.lora.alpha, general.architecture=llama,
  `<base tensor>.lora_a` (ne [in, r]) / `.lora_b` (ne [r, out]) for every module, B's rows of
  attn_q / attn_k permuted as the base export permutes the weights, per-module scales folded into
  B, the adapter's prompt type; f32, f16 and q8_0.
- The base GGUF with `--lora adapter.gguf` gives the logits of the merged model's GGUF
  (tools/merge_lora.py then convert_gguf.py): within the engine's f32 tolerance on an f32 base,
  within the q8_0 tolerance on a q8_0 base, at run time and merged at load (--lora-mode), and
  greedy generation token for token; --lora-scale 0 gives the base's logits exactly; the shipped
  Q4_1 file with an adapter agrees with transformers + peft as the bare file does.
- Mismatches (another base's adapter, another architecture, a tensor the base lacks, a model
  passed as the adapter, an incomplete or non-finite adapter) are one-line errors naming both files.
- `--modelfile` writes ollama's FROM (the base GGUF) and ADAPTER (the adapter GGUF) lines.
- llama.cpp (llama-cpp-python, when installed) loads our adapter and generates the same greedy tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import NEEDS_CPP, ROOT, make_tiny_model
from test_vicuna_cpp import (LOGITS_RTOL, Q4_1_RTOL, _permute, embedded_q4_1, rel_err, run,  # noqa: F401
                             vicuna_asan, vicuna_builds)

sys.path.insert(0, os.path.join(ROOT, "tools"))

import convert_gguf  # noqa: E402
import merge_lora  # noqa: E402

pytestmark = NEEDS_CPP

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# a q8_0 file against transformers (tests/test_tools.py: max |diff| < 0.05 max |logit|); here the
# q8_0 base with the adapter against the q8_0 merged file, both quantized from the same weights
Q8_0_RTOL = 5e-2
PROMPT_IDS = [[1, 5, 99, 300, 7, 42, 120, 77], [1, 250, 3, 17], [1] + list(range(30, 110))]  # 8, 4, 81 tokens


@pytest.fixture(scope="module")
def vicuna(vicuna_builds):
    return vicuna_builds[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("lora-gguf")


def convert(argv: list[str]) -> None:
    assert convert_gguf.main([str(a) for a in argv]) == 0


def make_adapter(base_dir: str, out_dir, targets, r=4, alpha=8, seed=1, b_scale=0.3, **config) -> str:
    """A random peft adapter (A and B both non-zero), B scaled down so the model stays sane."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                  init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(b_scale)
    peft_model.save_pretrained(str(out_dir))
    return str(out_dir)


@pytest.fixture(scope="module")
def files(work, tiny_models):
    """The SentencePiece tiny model, an adapter on every linear layer plus embed_tokens and lm_head
    (per-module alpha and rank, trained with the chat template), its GGUF exports, and the merged
    model's f32 and q8_0 exports."""
    base = tiny_models["sp"]
    adapter = make_adapter(base, work / "lora", ALL_TARGETS + ["embed_tokens", "lm_head"],
                           alpha_pattern={"v_proj": 16}, rank_pattern={"o_proj": 2})
    with open(os.path.join(adapter, "training_config.json"), "w") as f:
        json.dump({"prompt_type": "chat"}, f)
    out = {"base_dir": base, "adapter": adapter}
    merged = merge_lora.merge(base, adapter, str(work / "merged"))
    for t in ("f32", "q8_0"):
        out[f"base.{t}"] = str(work / f"base.{t}.gguf")
        convert(["--model_path", base, "--outfile", out[f"base.{t}"], "--outtype", t, "--no-verify"])
        out[f"merged.{t}"] = str(work / f"merged.{t}.gguf")
        convert(["--model_path", merged, "--outfile", out[f"merged.{t}"], "--outtype", t, "--no-verify"])
    for t in ("f32", "f16", "q8_0"):
        out[f"lora.{t}"] = str(work / f"lora.{t}.gguf")
        convert(["--lora_path", adapter, "--model_path", base, "--outfile", out[f"lora.{t}"], "--outtype", t,
                 "--no-verify"])
    return out


def logits(vicuna, model, ids, tmp_path, *extra) -> np.ndarray:
    out = tmp_path / "logits.bin"
    run([vicuna, "eval", "-m", model, "--ids", ",".join(map(str, ids)), "--dump-logits", out, *extra])
    return np.fromfile(out, dtype="<f4")


def greedy(vicuna, model, ids, *extra, n=24) -> list[int]:
    out = run([vicuna, "run", "-m", model, "--ids", ",".join(map(str, ids)), "-n", n, "--temp", "0",
               "--repeat-penalty", "1", "--ignore-eos", "--print-ids", "-c", "256", "-t", "3", *extra])
    return [int(x) for x in out.stdout.split()]


# ---------------------------------------------------------------------------------------------
# the file


def test_adapter_gguf_is_llama_cpp_format(files):
    import gguf
    from safetensors.torch import load_file

    r = gguf.GGUFReader(files["lora.f32"])
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert isinstance(fields["adapter.lora.alpha"], float) and fields["adapter.lora.alpha"] == 8.0
    assert r.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert fields["vicuna.prompt_type"] == "chat"  # from the adapter's training_config.json
    assert fields["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert not any(k.startswith("tokenizer.") for k in fields)  # an adapter carries no vocabulary

    state = load_file(os.path.join(files["adapter"], "adapter_model.safetensors"))
    base = {t.name: t for t in gguf.GGUFReader(files["base.f32"]).tensors}
    tensors = {t.name: t for t in r.tensors}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    expected = {"token_embd.weight", "output.weight"} | {f"blk.{i}.{g}.weight" for i in range(2) for g in names}
    assert set(tensors) == {n + s for n in expected for s in (".lora_a", ".lora_b")}
    for name in expected:
        a, b, w = tensors[name + ".lora_a"], tensors[name + ".lora_b"], base[name]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        if name == "token_embd.weight":  # flipped, as llama.cpp's converter and loader have it
            assert list(w.shape) == [b.shape[1], a.shape[1]] and a.shape[0] == b.shape[0]
            continue
        # llama.cpp's checks: W ne [in, out], lora_a ne [in, r], lora_b ne [r, out]
        assert a.shape[0] == w.shape[0] and b.shape[1] == w.shape[1] and a.shape[1] == b.shape[0], name
    # values: A as trained; B with q/k rows permuted like the base's, v_proj's alpha 16 folded in
    # (its scale 16/4 against the file's 8/4), o_proj at rank 2 (rank_pattern)
    prefix = "base_model.model.model.layers.1."
    A = {k: state[prefix + v + ".lora_A.weight"].numpy() for k, v in names.items()}
    B = {k: state[prefix + v + ".lora_B.weight"].numpy() for k, v in names.items()}
    for k in names:
        assert np.array_equal(np.asarray(tensors[f"blk.1.{k}.weight.lora_a"].data), A[k]), k
    assert np.array_equal(np.asarray(tensors["blk.1.attn_q.weight.lora_b"].data), _permute(B["attn_q"], 4))
    assert np.array_equal(np.asarray(tensors["blk.1.attn_k.weight.lora_b"].data), _permute(B["attn_k"], 2))
    np.testing.assert_allclose(np.asarray(tensors["blk.1.attn_v.weight.lora_b"].data), 2 * B["attn_v"], rtol=1e-6)
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_down.weight.lora_b"].data), B["ffn_down"])
    assert tensors["blk.1.attn_output.weight.lora_a"].shape[1] == 2

    # the other types: f16 everywhere; q8_0 where a row splits into blocks of 32, F16 otherwise
    T = gguf.GGMLQuantizationType
    f16 = {t.name: t.tensor_type for t in gguf.GGUFReader(files["lora.f16"]).tensors}
    assert set(f16.values()) == {T.F16}
    q8 = {t.name: t.tensor_type for t in gguf.GGUFReader(files["lora.q8_0"]).tensors}
    assert q8["blk.0.attn_q.weight.lora_a"] == T.Q8_0 and q8["blk.0.attn_q.weight.lora_b"] == T.F16  # rows of r=4


# ---------------------------------------------------------------------------------------------
# logits: base + adapter = merged


@pytest.mark.parametrize("mode", ["runtime", "merge"])
def test_f32_base_with_adapter_equals_merged_f32(vicuna, files, mode, tmp_path):
    for ids in PROMPT_IDS:
        want = logits(vicuna, files["merged.f32"], ids, tmp_path)
        for t in ("f32", "f16"):
            got = logits(vicuna, files["base.f32"], ids, tmp_path, "--lora", files[f"lora.{t}"], "--lora-mode", mode)
            bound = LOGITS_RTOL if t == "f32" else 5e-3  # f16 rounds A and B (11-bit mantissas)
            assert rel_err(got, want) < bound, (mode, t, len(ids), rel_err(got, want))
    ids = PROMPT_IDS[1]
    assert greedy(vicuna, files["base.f32"], ids, "--lora", files["lora.f32"], "--lora-mode", mode) == \
        greedy(vicuna, files["merged.f32"], ids)


@pytest.mark.parametrize("mode", ["runtime", "merge"])
def test_q8_0_base_with_adapter_close_to_merged_q8_0(vicuna, files, mode, tmp_path):
    for ids in PROMPT_IDS:
        want = logits(vicuna, files["merged.q8_0"], ids, tmp_path)
        got = logits(vicuna, files["base.q8_0"], ids, tmp_path, "--lora", files["lora.f16"], "--lora-mode", mode)
        # (a random model's top logits nearly tie, so no top-1 check: the merged file rounds
        # W + BA to q8_0 once, the adapter keeps BA out of the rounding)
        assert rel_err(got, want) < Q8_0_RTOL, (mode, len(ids), rel_err(got, want))


def test_lora_scale_zero_is_the_base_exactly(vicuna, files, tmp_path):
    for base in ("base.f32", "base.q8_0"):
        for ids in PROMPT_IDS[:2]:
            bare = logits(vicuna, files[base], ids, tmp_path)
            zero = logits(vicuna, files[base], ids, tmp_path, "--lora", files["lora.f16"], "--lora-scale", "0")
            assert np.array_equal(bare, zero)
    # and the scale does scale: 1 is the merged model, 0.5 lies in between
    ids = PROMPT_IDS[0]
    half = logits(vicuna, files["base.f32"], ids, tmp_path, "--lora", files["lora.f32"], "--lora-scale", "0.5")
    assert rel_err(half, logits(vicuna, files["base.f32"], ids, tmp_path)) > 1e-3
    assert rel_err(half, logits(vicuna, files["merged.f32"], ids, tmp_path)) > 1e-3


def test_commands_take_the_adapter(vicuna, files, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("hello world, the quick brown fox jumps over the lazy dog. " * 20)
    ppl = {}
    for extra in ([], ["--lora", files["lora.f16"]]):
        out = run([vicuna, "perplexity", "-m", files["base.f32"], "-f", text, "-c", "64", "--chunks", "2", *extra])
        ppl[bool(extra)] = float(re.search(r"PPL = ([0-9.]+)", out.stdout.decode()).group(1))
    merged = run([vicuna, "perplexity", "-m", files["merged.f32"], "-f", text, "-c", "64", "--chunks", "2"])
    assert ppl[True] != ppl[False]
    assert ppl[True] == pytest.approx(float(re.search(r"PPL = ([0-9.]+)", merged.stdout.decode()).group(1)), rel=1e-3)
    out = run([vicuna, "bench", "-m", files["base.q8_0"], "--lora", files["lora.f16"], "-p", "16", "-n", "4",
               "-t", "2", "-v"])
    assert re.search(r"decode: [0-9.]+ tok/s", out.stdout.decode())
    assert "applied at run time" in out.stderr.decode()  # tiny adapter: auto keeps it at run time
    chat = run([vicuna, "chat", "-m", files["base.f32"], "--lora", files["lora.f16"], "-n", "4", "-c", "128",
                "--temp", "0"], stdin=b"hello\n")
    assert chat.returncode == 0


# ---------------------------------------------------------------------------------------------
# the shipped Q4_1 file with an adapter


@pytest.fixture(scope="module")
def embedded_adapters(work, embedded_path):
    """r=8 on q,v and r=16 on every linear layer, on the embedded SmolLM2, as GGUF adapters."""
    out = {}
    for name, r, targets in (("qv8", 8, ["q_proj", "v_proj"]), ("all16", 16, ALL_TARGETS)):
        folder = make_adapter(embedded_path, work / f"emb-{name}", targets, r=r, alpha=2 * r, b_scale=0.02)
        out[name] = (folder, str(work / f"emb-{name}.gguf"))
        convert(["--lora_path", folder, "--model_path", embedded_path, "--outfile", out[name][1], "--no-verify"])
    return out


def test_shipped_q4_1_with_adapter_matches_peft(vicuna, embedded_q4_1, embedded_path, embedded_adapters, tmp_path):
    """The shipped file as is (Q4_1, Q8_0 classifier) with each adapter, against transformers +
    peft on its dequantized weights: the bare file's tolerance. auto applies the q,v adapter at run
    time (1 % of the bytes a token reads) and merges the all-layer one at load (10 %)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models import load_adapter

    tok = AutoTokenizer.from_pretrained(embedded_path)
    ids = tok("The capital of France is Paris. The capital of Germany")["input_ids"]
    for name, how in (("qv8", "applied at run time"), ("all16", "merged into the weights at load")):
        folder, gguf_path = embedded_adapters[name]
        model = load_adapter(AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32), folder)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].numpy()
        for mode in ("auto", "runtime"):
            got = logits(vicuna, embedded_q4_1, ids, tmp_path, "--lora", gguf_path, "--lora-mode", mode)
            assert int(got.argmax()) == int(ref.argmax()), (name, mode)
            assert rel_err(got, ref) < Q4_1_RTOL, (name, mode, rel_err(got, ref))
        out = run([vicuna, "bench", "-m", embedded_q4_1, "--lora", gguf_path, "-p", "8", "-n", "2", "-v"])
        assert how in out.stderr.decode(), out.stderr.decode()


# ---------------------------------------------------------------------------------------------
# mismatches: one line naming both files


def _write_adapter(path, tensors: dict, arch="llama", kind="adapter", alpha=8.0):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(kind)
    if kind == "adapter":
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", alpha)
    for name, data in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_mismatches_are_one_line_errors(vicuna_asan, files, work, tiny_models, tmp_path):
    base = files["base.f32"]
    other = make_tiny_model(str(work / "other"), tiny_models["sp"], hidden_size=32)
    other_adapter = make_adapter(other, work / "lora-other", ["q_proj", "v_proj"])
    other_gguf = str(work / "lora-other.gguf")
    convert(["--lora_path", other_adapter, "--model_path", other, "--outfile", other_gguf, "--no-verify"])
    a, b = np.ones((4, 64), np.float32), np.ones((64, 4), np.float32)  # lora_a ne [64, 4], lora_b ne [4, 64]
    nan_a = a.copy()
    nan_a[1, 2] = np.nan
    cases = {
        "another base's adapter": (other_gguf, True, "does not fit"),
        "another architecture": (_write_adapter(tmp_path / "qwen.gguf", {"blk.0.attn_q.weight.lora_a": a,
                                                                          "blk.0.attn_q.weight.lora_b": b},
                                                arch="qwen2"), True, "architecture 'qwen2'"),
        "a tensor the base lacks": (_write_adapter(tmp_path / "blk7.gguf", {"blk.7.attn_q.weight.lora_a": a,
                                                                             "blk.7.attn_q.weight.lora_b": b}),
                                    True, "no weight 'blk.7.attn_q.weight'"),
        "a wrong rank pairing": (_write_adapter(tmp_path / "rank.gguf", {"blk.0.attn_q.weight.lora_a": a,
                                                                          "blk.0.attn_q.weight.lora_b": b[:, :3]}),
                                 True, "does not fit"),
        "a model as the adapter": (files["merged.f32"], False, "not a LoRA adapter"),
        "half a pair": (_write_adapter(tmp_path / "half.gguf", {"blk.0.attn_q.weight.lora_a": a}), False,
                        "has lora_a but no lora_b"),
        "not finite": (_write_adapter(tmp_path / "nan.gguf", {"blk.0.attn_q.weight.lora_a": nan_a,
                                                              "blk.0.attn_q.weight.lora_b": b}), False,
                       "NaN or infinite"),
        "not a lora tensor": (_write_adapter(tmp_path / "odd.gguf", {"blk.0.attn_q.weight": a}), False,
                              "neither a .lora_a nor a .lora_b"),
    }
    for mode in ("runtime", "merge"):  # the good path under ASan/UBSan too: every LoRA kernel, 3 threads
        for adapter in (files["lora.f16"], files["lora.q8_0"]):
            proc = run([vicuna_asan, "cli", "run", "-m", base, "--ids", ",".join(map(str, PROMPT_IDS[0])), "-n", "4",
                        "--temp", "0", "-t", "3", "--lora", adapter, "--lora-mode", mode], check=False, timeout=120)
            assert proc.returncode == 0 and b"Sanitizer" not in proc.stderr, proc.stderr.decode()[-2000:]
    for what, (adapter, names_base, words) in cases.items():
        for cmd in (["eval", "-m", base, "--ids", "1,2,3", "--dump-logits", tmp_path / "x.bin"],
                    ["run", "-m", base, "-p", "hi", "-n", "2", "-c", "64"]):
            proc = run([vicuna_asan, "cli", *cmd, "--lora", adapter], check=False, timeout=120)
            err = proc.stderr.decode(errors="replace").strip()
            assert proc.returncode == 1, (what, err[-2000:])
            assert len(err.splitlines()) == 1 and ": error: " in err, (what, err[-2000:])
            assert words in err and adapter in err, (what, err)
            if names_base:
                assert base in err, (what, err)
    proc = run([vicuna_asan, "cli", "eval", "-m", base, "--ids", "1", "--dump-logits", tmp_path / "x.bin",
                "--lora-scale", "2"], check=False)
    assert proc.returncode == 1 and b"--lora-scale needs an adapter" in proc.stderr
    proc = run([vicuna_asan, "cli", "eval", "-m", base, "--ids", "1", "--dump-logits", tmp_path / "x.bin",
                "--lora", files["lora.f16"], "--lora-mode", "sometimes"], check=False)
    assert proc.returncode == 1 and b"--lora-mode must be" in proc.stderr


def cli_error(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        convert_gguf.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_export_refuses_what_does_not_fit(files, work, tiny_models, capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "x.gguf"
    # the adapter against another base: both named
    err = cli_error(capsys, ["--lora_path", files["adapter"], "--model_path", tiny_models["bpe"], "--outfile", out])
    assert "does not fit" in err and files["adapter"] in err and tiny_models["bpe"] in err
    other = make_tiny_model(str(work / "other2"), tiny_models["sp"], hidden_size=32)
    other_gguf = str(work / "other2.f32.gguf")
    convert(["--model_path", other, "--outfile", other_gguf, "--outtype", "f32", "--no-verify"])
    err = cli_error(capsys, ["--lora_path", files["adapter"], "--model_path", files["base_dir"], "--base_gguf",
                             other_gguf, "--outfile", out])
    assert "does not fit" in err and other_gguf in err
    # non-finite adapters are refused (models.check_adapter_file)
    bad = tmp_path / "nan-adapter"
    shutil.copytree(files["adapter"], bad)
    state = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in state if "lora_B" in k)
    state[key][0, 0] = float("nan")
    save_file(state, str(bad / "adapter_model.safetensors"))
    err = cli_error(capsys, ["--lora_path", bad, "--model_path", files["base_dir"], "--outfile", out])
    assert "NaN" in err or "not finite" in err or "infinite" in err
    assert not out.exists()
    # 4-bit adapters, and --base_gguf without an adapter
    err = cli_error(capsys, ["--lora_path", files["adapter"], "--model_path", files["base_dir"], "--outfile", out,
                             "--outtype", "q4_0"])
    assert "--outtype q4_0" in err
    err = cli_error(capsys, ["--model_path", files["base_dir"], "--base_gguf", files["base.f32"], "--outfile", out])
    assert "--base_gguf goes with --lora_path" in err


def test_legacy_and_plain_adapters_export(vicuna, work, tiny_models, tmp_path):
    """A Chinese-Vicuna checkpoint (pytorch_model.bin with `.default` keys, config in the run folder)
    exports to the same GGUF tensors as the plain peft adapter it was made from."""
    import gguf
    from safetensors.torch import load_file

    plain = make_adapter(tiny_models["bpe"], work / "plain", ["q_proj", "v_proj"], seed=3)
    run_dir = work / "lora-Vicuna"
    (run_dir / "checkpoint-800").mkdir(parents=True)
    config = json.load(open(os.path.join(plain, "adapter_config.json")))
    (run_dir / "adapter_config.json").write_text(json.dumps(config))
    state = {k.replace(".lora_A.", ".lora_A.default."): v for k, v in
             load_file(os.path.join(plain, "adapter_model.safetensors")).items()}
    torch.save(state, run_dir / "checkpoint-800" / "pytorch_model.bin")
    paths = {}
    for name, folder in (("plain", plain), ("legacy", run_dir / "checkpoint-800")):
        paths[name] = tmp_path / f"{name}.gguf"
        convert(["--lora_path", folder, "--model_path", tiny_models["bpe"], "--outfile", paths[name], "--outtype",
                 "f32", "--no-verify"])
    got = [{t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(paths[n])).tensors} for n in ("plain", "legacy")]
    assert got[0].keys() == got[1].keys() and len(got[0]) == 2 * 2 * 2
    assert all(np.array_equal(got[0][k], got[1][k]) for k in got[0])


def test_verify_runs_the_adapter_in_vicuna(vicuna, files, capsys, tmp_path):
    out = tmp_path / "v.gguf"
    assert convert_gguf.main(["--lora_path", files["adapter"], "--model_path", files["base_dir"], "--base_gguf",
                              files["base.f32"], "--outfile", str(out), "--outtype", "f32", "--verify"]) == 0
    report = capsys.readouterr().out
    assert "verify (vicuna.cpp" in report and "top-1 agreement 3/3" in report, report


# ---------------------------------------------------------------------------------------------
# ollama Modelfile


def test_modelfile_names_base_and_adapter(files, work, capsys):
    folder = work / "ollama"
    folder.mkdir()
    shutil.copy(files["base.f32"], folder / "base.gguf")
    convert(["--lora_path", files["adapter"], "--model_path", files["base_dir"], "--outfile",
             folder / "adapter.gguf", "--modelfile", "--base_gguf", folder / "base.gguf", "--no-verify"])
    text = (folder / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./base.gguf" in lines and "ADAPTER ./adapter.gguf" in lines
    assert lines.index("FROM ./base.gguf") + 1 == lines.index("ADAPTER ./adapter.gguf")
    assert 'PARAMETER stop "\\nUser:"' in lines  # the adapter's chat template
    # a base elsewhere is named by its absolute path; without a known base GGUF: one line
    elsewhere = work / "ollama2"
    elsewhere.mkdir()
    convert(["--lora_path", files["adapter"], "--model_path", files["base_dir"], "--outfile",
             elsewhere / "adapter.gguf", "--modelfile", "--base_gguf", files["base.f32"], "--no-verify"])
    assert f"FROM {files['base.f32']}" in (elsewhere / "Modelfile").read_text().splitlines()
    err = cli_error(capsys, ["--lora_path", files["adapter"], "--model_path", files["base_dir"], "--outfile",
                             work / "ollama3.gguf", "--modelfile"])
    assert "--base_gguf" in err and not (work / "ollama3.gguf").exists()


# ---------------------------------------------------------------------------------------------
# llama.cpp reads our adapter (only when llama-cpp-python is installed)


def test_llama_cpp_applies_our_adapter(vicuna, files, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")

    ids = PROMPT_IDS[1]
    llm = llama_cpp.Llama(model_path=files["base.f32"], lora_path=files["lora.f32"], n_ctx=128, logits_all=True,
                          verbose=False)
    theirs = []
    llm.eval(list(ids))
    first = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    for _ in range(16):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(nxt)
        llm.eval([nxt])
    assert greedy(vicuna, files["base.f32"], ids, "--lora", files["lora.f32"], "--lora-mode", "runtime", n=16) == theirs
    # measured 4e-5 with llama-cpp-python 0.3.36 (an adapter on embeddings, lm_head and every layer)
    assert rel_err(first, logits(vicuna, files["base.f32"], ids, tmp_path, "--lora", files["lora.f32"])) < 1e-3
