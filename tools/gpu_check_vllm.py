"""GPU check of serve.py --engine vllm: the same greedy answer as --engine hf (docs/performance.md).

    python tools/gpu_check_vllm.py [--tokens 32] [--json out.json]     # needs a CUDA GPU and `pip install vllm`
    python tools/gpu_check_vllm.py --dry-run                           # CPU: the commands only

Makes a LoRA adapter on the embedded SmolLM2-135M-Instruct (random, non-zero lora_B, trained-with
prompt type `instruct`, so vLLM gets our Jinja template), then for each engine starts
`serve.py --engine E --lora adp=ADAPTER` on a free loopback port, asks the same chat question of the
base and of the adapter (greedy, repetition_penalty 1.0, max_tokens --tokens) through the OpenAI API,
stops the server, and compares the answers: the adapter's must be equal to pass (otherwise the common
prefix is reported: vLLM's bf16 kernels may part from transformers' after some tokens). The base's are
shown only: vLLM applies one chat template to every model it serves (here the adapter's instruct
template), while --engine hf gives the base its tokenizer's chat template. Expected time: 2-4 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QUESTION = "Name three rivers in Europe."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(out_dir: str) -> str:
    import torch
    from peft import LoraConfig, get_peft_model

    from models import EMBEDDED_MODEL, load_model, resolve_model_path

    torch.manual_seed(0)
    model = load_model(resolve_model_path(EMBEDDED_MODEL))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "training_config.json"), "w") as f:
        json.dump({"prompt_type": "instruct"}, f)
    return out_dir


def ask(url: str, model: str, tokens: int) -> str:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": tokens, "repetition_penalty": 1.0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def answers(engine: str, adapter: str, tokens: int, log) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, os.path.join(ROOT, "serve.py"), "--engine", engine, "--port", str(port),
           "--lora", f"adp={adapter}", "--served_model_name", "base"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log)
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{engine}: the server exited with {proc.returncode}; see the log")
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"{engine}: the server did not start in 600 s")
            time.sleep(1)
        t0 = time.time()
        out = {model: ask(url, model, tokens) for model in ("base", "adp")}
        out["seconds"] = time.time() - t0
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the vllm command for a sample adapter and exit")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="gpu-check-vllm-")
    adapter = make_adapter(os.path.join(work, "adp"))
    if args.dry_run:
        out = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--engine", "vllm", "--dry_run",
                              "--lora", f"adp={adapter}", "--served_model_name", "base"], cwd=ROOT,
                             capture_output=True, text=True)
        print(out.stdout or out.stderr, end="")
        return out.returncode
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA GPU (use --dry-run on the CPU)")
    result = {}
    with open(os.path.join(work, "servers.log"), "w") as log:
        for engine in ("hf", "vllm"):
            result[engine] = answers(engine, adapter, args.tokens, log)
    ok = True
    for model in ("base", "adp"):
        a, b = result["hf"][model], result["vllm"][model]
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same = a == b
        ok &= same or model == "base"
        print(f"{model}: {'same' if same else f'differ after {common} characters'}\n  hf:   {a!r}\n  vllm: {b!r}")
    print(f"log: {os.path.join(work, 'servers.log')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
