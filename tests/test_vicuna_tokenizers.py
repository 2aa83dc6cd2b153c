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

from test_vicuna_cpp import vicuna, vicuna_builds  # noqa: F401  (the session's engine build)

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
