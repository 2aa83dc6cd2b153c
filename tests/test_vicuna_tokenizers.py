"""vicuna.cpp's tokenizer against llama.cpp's own tokenizer tests (issue 13).

llama.cpp ships test vocabularies, models/ggml-vocab-<name>.gguf, with cases: <name>.gguf.inp
holds input texts separated by "\\n__ggml_vocab_test__\\n", <name>.gguf.out one line of expected
token ids per input, made by the reference tokenizer of each model (tokenize with
add_special=false and special-token text not parsed; for SentencePiece the reference is
SentencePiece itself). The files (MIT, The ggml authors) are fetched by `make llama-vocab` from the
llama-cpp-python source package on PyPI into .cache/llama-vocab; `make test` fetches them first.
Without them these tests skip.

Every vocabulary with cases either passes all of them or is refused by `vicuna tokenize` with one
line naming the tokenizer model or pre-tokenizer it does not implement. Per-vocabulary counts:

    .venv/bin/python tests/test_vicuna_tokenizers.py
"""

import os
import subprocess
import sys

import pytest

from test_vicuna_cpp import (  # noqa: F401  (session fixtures)
    embedded_q4_1, mixed_strings, vicuna, vicuna_asan, vicuna_builds)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_DIR = os.path.join(ROOT, ".cache", "llama-vocab")
ENGINE = os.path.join(ROOT, "tools", "vicuna.cpp", "build", "vicuna")
SEP = b"\n__ggml_vocab_test__\n"

PASS = None
# name -> None (every case passes) or the exact one-line refusal (after "tokenizer_init: error: 'PATH': ")
EXPECTED = {
    "llama-spm": PASS,
    "phi-3": PASS,
    "llama-bpe": PASS,
    "qwen2": PASS,
    "qwen35": PASS,
    "gpt-2": PASS,
    "mpt": PASS,
    "starcoder": PASS,
    "refact": PASS,
    "command-r": PASS,
    "falcon": PASS,
    "deepseek-llm": "tokenizer.ggml.pre 'deepseek-llm' is not supported",
    "deepseek-coder": "tokenizer.ggml.pre 'deepseek-coder' is not supported",
    "bert-bge": "tokenizer.ggml.model 'bert' is not supported",
    "gemma-4": "tokenizer.ggml.model 'gemma4' is not supported",
}


def vocab_path(name: str) -> str:
    return os.path.join(VOCAB_DIR, f"ggml-vocab-{name}.gguf")


def load_cases(name: str) -> list[tuple[bytes, list[int]]]:
    with open(vocab_path(name) + ".inp", "rb") as f:
        inputs = f.read().split(SEP)
    with open(vocab_path(name) + ".out", "rb") as f:
        outputs = f.read().decode().split("\n")
    if len(outputs) == len(inputs) + 1 and outputs[-1] == "":
        outputs.pop()
    assert len(inputs) == len(outputs), f"{name}: {len(inputs)} inputs, {len(outputs)} outputs"
    return [(i, [int(x) for x in o.split()]) for i, o in zip(inputs, outputs)]


def escape_line(s: bytes) -> bytes:
    return s.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r").replace(b"\t", b"\\t")


def tokenize_all(engine: str, name: str, texts: list[bytes], tmp_dir: str):
    """(ids per text, None) or (None, stderr's text) when the engine refuses the file."""
    lines = os.path.join(tmp_dir, f"{name}.txt")
    with open(lines, "wb") as f:
        f.write(b"".join(escape_line(t) + b"\n" for t in texts))
    proc = subprocess.run([engine, "tokenize", "-m", vocab_path(name), "--no-bos", "-f", lines, "--lines"],
                          capture_output=True, timeout=120)
    if proc.returncode != 0:
        return None, proc.stderr.decode(errors="replace")
    got = proc.stdout.decode().split("\n")[:len(texts)]
    return [[int(x) for x in line.split()] for line in got], None


def conformance(engine: str, name: str, tmp_dir: str):
    """(passed, total, failures, refusal)"""
    cases = load_cases(name)
    got, err = tokenize_all(engine, name, [c[0] for c in cases], tmp_dir)
    if got is None:
        return 0, len(cases), [], err
    bad = [f"{text!r}:\n  ours {ids}\n  llama.cpp {ref}" for (text, ref), ids in zip(cases, got) if ids != ref]
    return len(cases) - len(bad), len(cases), bad, None


@pytest.fixture(scope="module")
def engine(request):
    if not os.path.exists(os.path.join(VOCAB_DIR, ".fetched")):
        pytest.skip("llama.cpp's test vocabularies are not in .cache/llama-vocab: run `make llama-vocab` "
                    "(make test does)")
    return request.getfixturevalue("vicuna")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_llama_cpp_vocab(engine, name, tmp_path):
    passed, total, bad, err = conformance(engine, name, str(tmp_path))
    refusal = EXPECTED[name]
    if refusal is PASS:
        assert err is None, f"{name}: refused: {err}"
        assert not bad, f"{name}: {passed}/{total} cases pass; failures:\n" + "\n".join(bad[:8])
    else:
        assert err is not None, f"{name}: expected a refusal, got {passed}/{total} cases passing"
        lines = err.strip().split("\n")
        assert len(lines) == 1, err
        prefix = f"tokenizer_init: error: '{vocab_path(name)}': {refusal}"
        assert lines[0].startswith(prefix), f"{lines[0]!r} does not start with {prefix!r}"


# the vocabularies llama.cpp ships without cases: loaded, or refused in one line
WITHOUT_CASES = {
    "baichuan": PASS,
    "aquila": "tokenizer.ggml.pre is missing",
    "gpt-neox": "tokenizer.ggml.pre is missing",
    "nomic-bert-moe": "tokenizer.ggml.model 't5' is not supported",
}


@pytest.mark.parametrize("name", sorted(WITHOUT_CASES))
def test_llama_cpp_vocab_without_cases(engine, name):
    proc = subprocess.run([engine, "tokenize", "-m", vocab_path(name), "--no-bos", "-p", "Hello world"],
                          capture_output=True, timeout=60)
    refusal = WITHOUT_CASES[name]
    if refusal is PASS:
        assert proc.returncode == 0 and proc.stdout.split(), proc.stderr.decode(errors="replace")
    else:
        lines = proc.stderr.decode(errors="replace").strip().split("\n")
        assert proc.returncode != 0 and len(lines) == 1, lines
        assert lines[0].startswith(f"tokenizer_init: error: '{vocab_path(name)}': {refusal}"), lines[0]


def test_bytes_without_a_token(engine, embedded_q4_1, tmp_path):
    """Bytes that are not UTF-8 are their byte tokens where the vocabulary has them (GPT-2), U+FFFD
    where it does not (SmolLM2 has no token for 0xFE, 0xFF: llama.cpp does the same); a byte with
    no token at all (SmolLM2's 0x04) is dropped as transformers drops it, never the unknown id 0,
    which is SmolLM2's <|endoftext|>."""
    def ids(model, text: bytes):
        f = tmp_path / "t.txt"
        f.write_bytes(text)
        return [int(x) for x in subprocess.run([engine, "tokenize", "-m", model, "--no-bos", "-f", f],
                                               capture_output=True, check=True).stdout.split()]

    gpt2 = vocab_path("gpt-2")
    assert ids(gpt2, b"a\xfe\xffb") == ids(gpt2, b"a") + [186, 187] + ids(gpt2, b"b")  # the tokens "\u00fe", "\u00ff"
    assert ids(embedded_q4_1, b"a\xfe\xffb") == ids(embedded_q4_1, "a\ufffd\ufffdb".encode())
    assert ids(embedded_q4_1, b"a\x04b") == ids(embedded_q4_1, b"a") + ids(embedded_q4_1, b"b")  # as transformers
    assert 0 not in ids(embedded_q4_1, bytes(range(1, 256)))


def test_pretokenizers_under_sanitizers(engine, vicuna_asan, tmp_path):
    """Every accepted vocabulary on 200 random strings of the characters the pre-tokenizers treat
    apart (digits, quotes, Falcon's symbols, marks, CJK, Unicode spaces, invalid bytes), one by one
    and all in one text, under ASan/UBSan: exit 0 and nothing on stderr."""
    import random

    rng = random.Random(5)
    pool = "aZ 1234567890 \n\r\t'sLL!?.,$+<=>^~|`你好世界，。Việt é\u0301 ẞ 🦙 \u3000\u00a0\u200b\x04"
    texts = []
    for _ in range(200):
        t = "".join(rng.choice(pool) for _ in range(rng.randint(0, 40))).encode()
        if rng.random() < 0.3:
            t += bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        texts.append(t)
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"".join(escape_line(t) + b"\n" for t in texts + [b"".join(texts)]))
    for name in sorted(n for n, r in EXPECTED.items() if r is PASS):
        proc = subprocess.run([vicuna_asan, "cli", "tokenize", "-m", vocab_path(name), "--no-bos", "-f", lines,
                               "--lines"], capture_output=True, timeout=300)
        assert proc.returncode == 0 and not proc.stderr, (name, proc.stderr.decode(errors="replace")[-2000:])


def sentencepiece_from_gguf(path: str):
    """A SentencePiece processor with the GGUF's vocabulary and LLaMA's normalizer settings
    (identity, add_dummy_prefix, whitespace kept, byte fallback): the reference for LLaMA-1/2."""
    import sentencepiece as spm
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as pb

    r = GGUFReader(path)

    def arr(key):
        f = r.fields[key]
        return [f.parts[i] for i in f.data]

    m = pb.ModelProto()
    for piece, score, ttype in zip(arr("tokenizer.ggml.tokens"), arr("tokenizer.ggml.scores"),
                                   arr("tokenizer.ggml.token_type")):
        p = m.pieces.add()
        p.piece, p.score, p.type = bytes(piece).decode(), float(score[0]), int(ttype[0])
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.vocab_size = len(m.pieces)
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def test_llama_spm_matches_sentencepiece(engine, tmp_path):
    """LLaMA-1/2's vocabulary against SentencePiece itself, on llama.cpp's cases and 300 mixed
    Chinese/English strings (the U+2581 prefix goes in front of a leading space too)."""
    sp = sentencepiece_from_gguf(vocab_path("llama-spm"))
    texts = [c[0].decode() for c in load_cases("llama-spm")] + mixed_strings(300, seed=13, specials=[])
    got, err = tokenize_all(engine, "llama-spm", [t.encode() for t in texts], str(tmp_path))
    assert err is None, err
    bad = [f"{t!r}: ours {ids} sentencepiece {sp.encode(t)}" for t, ids in zip(texts, got) if ids != sp.encode(t)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g.\n" + "\n".join(bad[:5])


def main() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(EXPECTED):
            passed, total, bad, err = conformance(ENGINE, name, tmp)
            print(f"{name:16} " + (f"refused: {err.strip()}" if err else f"{passed}/{total}"))
            for b in bad[:3]:
                print("   ", b.replace("\n", "\n    "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
