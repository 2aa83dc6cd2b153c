"""The shipped scripts/*.sh and config-sample/ files, checked without training anything.

Each script is run with PYTHON and TORCHRUN pointing at a stub that prints the launcher it stands
for, CUDA_VISIBLE_DEVICES, the working directory and its argv (NUL-separated, so paths with spaces
survive). The argv after the entry script is then parsed with that entry script's own parser.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import shlex

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCRIPTS_DIR = ROOT / "scripts"
CONFIG_DIR = ROOT / "config-sample"
SCRIPTS = sorted(p.name for p in SCRIPTS_DIR.glob("finetune*.sh"))  # training launchers (common.sh)
SERVE_SCRIPTS = {"generate.sh": "generate", "chat.sh": "chat", "train_web.sh": "train_web"}  # page servers: plain python
ALL_SH = sorted(p.name for p in SCRIPTS_DIR.glob("*.sh"))
ENV_VARS = ("TOT_CUDA", "PORT", "PAGE_PORT", "DATA_PATH", "OUTPUT_PATH", "MODEL_PATH", "LORA_PATH", "DS_CONFIG",
            "PYTHON", "TORCHRUN", "CUDA_VISIBLE_DEVICES")
TORCHRUN_FLAGS = {"--nproc_per_node", "--master_port"}
UNSET = "<unset>"

# Scripts that need more than the common variables, and their non-common defaults.
EXTRA_ENV = {"finetune_continue.sh": {"LORA_PATH": "some lora/adapter"}}
DEFAULT_TOT_CUDA = {"finetune_deepspeed.sh": "0,1"}  # DeepSpeed assumes 2+ GPUs

STUB = """#!/usr/bin/env bash
printf '%s\\0' "{name}" "${{CUDA_VISIBLE_DEVICES-{unset}}}" "$PWD" "$@"
"""


def test_found_the_scripts():
    assert {"finetune.sh", "finetune_4bit.sh", "finetune_chat.sh", "finetune_continue.sh",
            "finetune_deepspeed.sh"} <= set(SCRIPTS)
    assert "common.sh" in ALL_SH


@dataclasses.dataclass
class Launch:
    returncode: int
    stderr: str
    launcher: str = ""
    cuda: str = ""
    cwd: str = ""
    argv: list[str] = dataclasses.field(default_factory=list)  # after the launcher

    @property
    def entry_index(self) -> int:
        return next(i for i, a in enumerate(self.argv) if a.endswith(".py"))

    @property
    def entry(self) -> str:
        return self.argv[self.entry_index]

    @property
    def script_args(self) -> list[str]:
        return self.argv[self.entry_index + 1:]

    def value(self, flag: str) -> str | None:
        """The value of the last `flag` in the entry script's args (argparse: last one wins)."""
        args = self.script_args
        hits = [i for i, a in enumerate(args) if a == flag]
        return args[hits[-1] + 1] if hits else None


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stubs")
    paths = {}
    for name in ("python", "torchrun"):
        path = folder / f"fake-{name}"
        path.write_text(STUB.format(name=name, unset=UNSET))
        path.chmod(0o755)
        paths[name] = str(path)
    return paths


@pytest.fixture
def run_script(stubs):
    def run(script: str, cwd: str | Path = ROOT, extra_args: tuple = (), **env_overrides) -> Launch:
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        env.update(PYTHON=stubs["python"], TORCHRUN=stubs["torchrun"])
        env.update(EXTRA_ENV.get(script, {}))
        for key, value in env_overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        proc = subprocess.run(["bash", str(SCRIPTS_DIR / script), *extra_args], cwd=cwd, env=env,
                              capture_output=True, timeout=30)
        result = Launch(proc.returncode, proc.stderr.decode())
        if proc.stdout:
            fields = proc.stdout.decode().split("\0")
            assert fields[-1] == "", "stub output not NUL-terminated"
            result.launcher, result.cuda, result.cwd, *result.argv = fields[:-1]
        return result

    return run


def parser_for(entry: str):
    """The argparse parser of finetune.py / finetune_4bit.py / finetune_chat.py with its defaults."""
    import train_args

    module = importlib.import_module(Path(entry).stem)
    defaults = {**train_args.DEFAULTS, **module.DEFAULTS}
    return train_args.build_parser(defaults)


def shell_code(path: Path) -> str:
    """The script without comment lines."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


# --- the scripts themselves -----------------------------------------------------------------------


@pytest.mark.parametrize("script", ALL_SH)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(SCRIPTS_DIR / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


FAILING_STUB = """#!/usr/bin/env bash
echo "launched $*" >> "{log}"
exit 7
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_failing_step_stops_the_script_with_its_status(script, tmp_path):
    """Strict mode, by its effects: the launcher's failure is the script's exit status; a script
    run from another folder still finds the repository; a missing tool stops it before anything
    runs, with bash's error rather than a half-done run."""
    log = tmp_path / "launched.log"
    stub = tmp_path / "fail"
    stub.write_text(FAILING_STUB.format(log=log))
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(PYTHON=str(stub), TORCHRUN=str(stub), **EXTRA_ENV.get(script, {}))
    proc = subprocess.run(["bash", str(SCRIPTS_DIR / script)], cwd=tmp_path, env=env, capture_output=True, timeout=30)
    assert proc.returncode == 7, proc.stderr.decode()
    launched = log.read_text().splitlines()
    assert len(launched) == 1 and ".py" in launched[0]  # launched once, and nothing after it
    env.update(PYTHON=str(tmp_path / "no-such-python"), TORCHRUN=str(tmp_path / "no-such-torchrun"))
    proc = subprocess.run(["bash", str(SCRIPTS_DIR / script)], cwd=tmp_path, env=env, capture_output=True, timeout=30)
    assert proc.returncode == 127 and b"no-such-" in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_flags_exist_in_entry_parser(script, run_script):
    result = run_script(script, MODEL_PATH="some/model")
    assert result.returncode == 0, result.stderr
    parser = parser_for(result.entry)
    try:
        _, unknown = parser.parse_known_args(result.script_args)
    except SystemExit:  # a bad value (choices, type) makes argparse exit
        pytest.fail(f"{script}: {result.entry} rejects {result.script_args} (see the captured stderr)")
    assert unknown == [], f"{script} passes flags {result.entry} does not have: {unknown}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_in_the_script_is_emitted(script, run_script):
    """So the parser check above sees every flag the script can pass, not only some."""
    written = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", shell_code(SCRIPTS_DIR / script)))
    result = run_script(script, MODEL_PATH="some/model")
    assert result.returncode == 0, result.stderr
    assert written - TORCHRUN_FLAGS <= set(result.script_args)


def test_instruction_scripts_share_one_recipe(run_script):
    """finetune.sh, its 4-bit, DeepSpeed and continue variants train on one schedule (common.sh)."""
    keys = ["--prompt_type", "--cutoff_len", "--micro_batch_size", "--batch_size", "--num_epochs", "--learning_rate",
            "--warmup_steps", "--test_size", "--eval_steps", "--save_steps", "--save_total_limit"]
    scripts = ["finetune.sh", "finetune_4bit.sh", "finetune_deepspeed.sh", "finetune_continue.sh"]
    recipes = {s: tuple(run_script(s).value(k) for k in keys) for s in scripts}
    assert len(set(recipes.values())) == 1 and None not in recipes["finetune.sh"], recipes
    lora = ["--lora_r", "--lora_alpha", "--lora_dropout", "--lora_target_modules"]
    assert {tuple(run_script(s).value(k) for k in lora) for s in scripts[:3]} == {("8", "16", "0.05", "q_proj,v_proj")}
    assert run_script("finetune_continue.sh").value("--lora_r") is None  # the continued adapter keeps its shape


@pytest.mark.parametrize("script", SCRIPTS)
def test_path_variables_override(script, run_script):
    env = dict(DATA_PATH="/data dir/new data.jsonl", OUTPUT_PATH="/out dir/lora", MODEL_PATH="/models/llama 7b")
    result = run_script(script, **env)
    assert result.returncode == 0, result.stderr
    assert result.value("--data_path") == env["DATA_PATH"]
    assert result.value("--output_path") == env["OUTPUT_PATH"]
    assert result.value("--model_path") == env["MODEL_PATH"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("model_path", [None, ""])
def test_no_model_path_uses_the_embedded_default(script, model_path, run_script):
    result = run_script(script, MODEL_PATH=model_path)
    assert result.returncode == 0, result.stderr
    assert "--model_path" not in result.script_args


@pytest.mark.parametrize("script", SCRIPTS)
def test_defaults_point_at_shipped_files(script, run_script):
    result = run_script(script, cwd="/")
    assert result.returncode == 0, result.stderr
    assert Path(result.cwd).resolve() == ROOT, "scripts must cd to the repository root"
    assert (ROOT / result.entry).is_file()
    assert (ROOT / result.value("--data_path")).is_file()
    if result.value("--deepspeed") is not None:
        assert (ROOT / result.value("--deepspeed")).is_file()


@pytest.mark.parametrize("script", SCRIPTS)
def test_tot_cuda_unset_or_empty_runs_plain_python(script, run_script):
    result = run_script(script, TOT_CUDA="")
    assert result.returncode == 0, result.stderr
    assert (result.launcher, result.cuda) == ("python", UNSET)
    assert result.argv[0].endswith(".py")
    if script not in DEFAULT_TOT_CUDA:
        result = run_script(script, TOT_CUDA=None)
        assert (result.launcher, result.cuda) == ("python", UNSET)


@pytest.mark.parametrize("script", SCRIPTS)
def test_one_gpu_runs_plain_python_on_that_gpu(script, run_script):
    result = run_script(script, TOT_CUDA="3")
    assert result.returncode == 0, result.stderr
    assert (result.launcher, result.cuda) == ("python", "3")
    assert result.argv[0].endswith(".py")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("tot_cuda, n", [("0,1", 2), ("4,5,6,7", 4)])
def test_several_gpus_run_torchrun(script, tot_cuda, n, run_script):
    result = run_script(script, TOT_CUDA=tot_cuda, PORT="23456")
    assert result.returncode == 0, result.stderr
    assert (result.launcher, result.cuda) == ("torchrun", tot_cuda)
    assert result.argv[:5] == ["--nproc_per_node", str(n), "--master_port", "23456", result.entry]


@pytest.mark.parametrize("script", SCRIPTS)
def test_default_port(script, run_script):
    result = run_script(script, TOT_CUDA="0,1", PORT=None)
    assert result.argv[:4] == ["--nproc_per_node", "2", "--master_port", "12345"]


def test_deepspeed_defaults_to_two_gpus(run_script):
    result = run_script("finetune_deepspeed.sh", TOT_CUDA=None)
    assert result.launcher == "torchrun"
    assert result.argv[:2] == ["--nproc_per_node", "2"]


def test_deepspeed_flag_exists_in_finetune():
    result_flags = {opt for action in parser_for("finetune.py")._actions for opt in action.option_strings}
    assert "--deepspeed" in result_flags, "scripts/finetune_deepspeed.sh passes --deepspeed to finetune.py"


@pytest.mark.parametrize("script", SCRIPTS)
def test_extra_args_are_passed_through_last(script, run_script):
    result = run_script(script, extra_args=("--num_epochs", "1", "--data_path", "x y.jsonl"))
    assert result.returncode == 0, result.stderr
    assert result.script_args[-4:] == ["--num_epochs", "1", "--data_path", "x y.jsonl"]
    args, _ = parser_for(result.entry).parse_known_args(result.script_args)
    assert (args.num_epochs, args.data_path) == (1.0, "x y.jsonl")


def test_continue_requires_lora_path(run_script):
    for lora_path in (None, ""):
        result = run_script("finetune_continue.sh", LORA_PATH=lora_path)
        assert result.returncode != 0
        assert result.launcher == "", "must stop before launching anything"
        assert "LORA_PATH" in result.stderr


def test_continue_passes_lora_path(run_script):
    result = run_script("finetune_continue.sh", LORA_PATH="/runs/lora Vicuna")
    assert result.returncode == 0, result.stderr
    assert result.value("--lora_path") == "/runs/lora Vicuna"


# --- config-sample --------------------------------------------------------------------------------

CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
ADAPTER_CONFIGS = {
    "adapter_config.json": {"q_proj", "v_proj"},
    "adapter_config_chat.json": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
}

# Keys the HF Trainer fills in for "auto" (transformers.integrations.deepspeed.trainer_config_process
# and trainer_config_finalize); an "auto" anywhere else reaches DeepSpeed as a string and fails.
HF_AUTO_KEYS = {
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping",
    "fp16.enabled", "bf16.enabled", "amp.enabled", "amp.opt_level",
    "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps", "optimizer.params.weight_decay",
    "scheduler.params.warmup_min_lr", "scheduler.params.warmup_max_lr", "scheduler.params.warmup_num_steps",
    "scheduler.params.total_num_steps",
    "zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
}


def test_found_the_configs():
    assert {"zero2.json", *ADAPTER_CONFIGS} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_json(name):
    with open(CONFIG_DIR / name, encoding="utf-8") as f:
        assert isinstance(json.load(f), dict)


def _auto_keys(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _auto_keys(value, path + ".")
        elif value == "auto":
            yield path


def test_zero2_config():
    config = json.loads((CONFIG_DIR / "zero2.json").read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["overlap_comm"] and zero["contiguous_gradients"]
    assert zero.get("offload_optimizer", {}).get("device", "none") == "none"
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert config[key] == "auto", f"{key} must come from finetune.py's flags"
    assert config["fp16"]["enabled"] == config["bf16"]["enabled"] == "auto"
    assert set(_auto_keys(config)) <= HF_AUTO_KEYS


@pytest.mark.parametrize("name", sorted(ADAPTER_CONFIGS))
def test_adapter_config_loads_as_lora_config(name, tmp_path):
    from peft import LoraConfig

    raw = json.loads((CONFIG_DIR / name).read_text())
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    config = LoraConfig(**{k: v for k, v in raw.items() if k in known})
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.05)
    assert set(config.target_modules) == ADAPTER_CONFIGS[name]
    assert config.task_type == "CAUSAL_LM" and config.bias == "none"
    assert raw["peft_type"] == "LORA" and raw["base_model_name_or_path"]

    # And through peft's own reader, as for an adapter folder.
    shutil.copy(CONFIG_DIR / name, tmp_path / "adapter_config.json")
    assert set(LoraConfig.from_pretrained(str(tmp_path)).target_modules) == ADAPTER_CONFIGS[name]


def test_readme_describes_every_config():
    readme = (CONFIG_DIR / "README.md").read_text()
    for name in CONFIGS:
        assert f"`{name}`" in readme, f"config-sample/README.md does not describe {name}"


@pytest.mark.parametrize("script,module", sorted(SERVE_SCRIPTS.items()))
def test_serving_scripts_pass_known_flags_and_overrides(script, module, tmp_path):
    """generate.sh / chat.sh: BASE_MODEL, LORA_PATH, TOT_CUDA and PAGE_PORT reach the entry script;
    PORT (the training scripts' torchrun master port) does not move the page."""
    import importlib

    clean = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env = dict(clean, PYTHON="echo", BASE_MODEL="my base", LORA_PATH="my lora", TOT_CUDA="1", PAGE_PORT="7999",
               PORT="23456")
    proc = subprocess.run(["bash", str(SCRIPTS_DIR / script), "--share"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "CUDA_VISIBLE_DEVICES=1" in proc.stderr and "note:" not in proc.stderr
    argv = shlex.split(proc.stderr.strip().splitlines()[-1].split(" ", 2)[2])[2:]  # after "echo ENTRY"
    assert argv == ["--port", "7999", "--model_path", "my base", "--lora_path", "my lora", "--share"]
    args = importlib.import_module(module).build_parser().parse_args(argv)
    assert (args.port, args.model_path, args.lora_path, args.share, args.host) == \
        (7999, "my base", "my lora", True, "127.0.0.1")
    bare = subprocess.run(["bash", str(SCRIPTS_DIR / script)], cwd=tmp_path, env=dict(clean, PYTHON="echo"),
                          capture_output=True, text=True)
    assert bare.stdout.split() == [f"{module}.py", "--port", "7860"]  # embedded model on the CPU
    assert bare.stderr.splitlines()[0].startswith("+ ")  # no note
    old_habit = subprocess.run(["bash", str(SCRIPTS_DIR / script)], cwd=tmp_path,
                               env=dict(clean, PYTHON="echo", PORT="7999"), capture_output=True, text=True)
    assert old_habit.stdout.split() == [f"{module}.py", "--port", "7860"]
    assert "note: PORT is the training scripts' torchrun master port; set PAGE_PORT" in old_habit.stderr


# --- cpu_chat.sh ----------------------------------------------------------------------------------

CPU_STUB = r"""#!/usr/bin/env bash
# Logs "name argv..." (NUL-separated, one call a line); answers the script's python -c questions;
# creates the --outfile / --output_path a real tool would write.
printf '%s\0' "$(basename "$0")" "$@" >> "$CALLS"; echo >> "$CALLS"
if [[ "$1" == -c ]]; then
  case "$2" in
    *embedded_gguf_path*) echo "$FAKE_EMBEDDED" ;;
    *find_spec*) echo "${MISSING_MODULE:-}" ;;
    *resolve_prompt_type*) echo instruct ;;
  esac
  exit 0
fi
prev=""
for a in "$@"; do
  case "$prev" in
    --outfile) mkdir -p "$(dirname "$a")"; : > "$a" ;;
    --output_path) mkdir -p "$a"; echo '{}' > "$a/config.json" ;;
  esac
  prev="$a"
done
"""


@pytest.fixture
def cpu_chat(tmp_path):
    """Run scripts/cpu_chat.sh with stub python, make and vicuna; returns (proc, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "make", "vicuna"):
        (bin_dir / name).write_text(CPU_STUB)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls"

    def make_adapter(name: str, content: str) -> str:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        (folder / "adapter_config.json").write_text('{"r": 8}')
        (folder / "adapter_model.safetensors").write_text(content)
        return str(folder)

    def run(script_dir: Path = SCRIPTS_DIR, extra_args: tuple = (), **env_overrides):
        log.write_text("")
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARS + ("MERGE", "OUTTYPE", "BASE_MODEL")}
        env.update(CALLS=str(log), PYTHON=str(bin_dir / "python"), MAKE=str(bin_dir / "make"),
                   VICUNA=str(tmp_path / "not-built" / "vicuna"), OUT_DIR=str(tmp_path / "out"),
                   FAKE_EMBEDDED="/shipped/SmolLM2.Q4_1.gguf", PATH=f"{bin_dir}:{os.environ['PATH']}")
        for key, value in env_overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        proc = subprocess.run(["bash", str(script_dir / "cpu_chat.sh"), *extra_args], env=env, capture_output=True,
                              text=True, timeout=30)
        calls = [line.split("\0") for line in log.read_text().split("\0\n") if line]
        return proc, calls

    run.make_adapter = make_adapter
    run.bin_dir = bin_dir
    return run


def _tool_calls(calls):
    return [c for c in calls if c[0] != "python" or c[1] != "-c"]


needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cpu_chat.sh stops without cmake")


@needs_cmake
def test_cpu_chat_default_runs_the_adapter_on_the_shipped_base(cpu_chat, tmp_path):
    """LORA_PATH alone: no merge; the adapter is exported as a GGUF adapter for the shipped Q4_1 file
    and `vicuna chat` runs base + --lora with no template flag (the adapter GGUF names its own)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_gguf

    lora = cpu_chat.make_adapter("lora one", "weights 1")
    proc, calls = cpu_chat(LORA_PATH=lora, extra_args=("--temp", "0"))
    assert proc.returncode == 127, proc.stderr  # the engine is a stub that was never built: exec fails last
    tools = _tool_calls(calls)
    assert [c[:2] for c in tools] == [["make", "cpp"], ["python", "tools/convert_gguf.py"]]
    args = convert_gguf.build_parser().parse_args(tools[1][2:])  # the tool's own parser takes them
    assert (args.lora_path, args.base_gguf, args.outtype) == (lora, "/shipped/SmolLM2.Q4_1.gguf", "f16")
    assert args.outfile.endswith("/adapter.f16.gguf") and args.prompt_type is None  # the adapter's own
    assert "merge_lora" not in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.startswith("+ ")][-1]
    chat = shlex.split(last[2:])
    assert chat[1:] == ["chat", "-t", chat[3], "-m", "/shipped/SmolLM2.Q4_1.gguf", "--lora", args.outfile,
                        "--temp", "0"]
    assert not any(a.startswith("--prompt-type") for a in chat)


@needs_cmake
def test_cpu_chat_exports_are_keyed_on_the_adapter(cpu_chat):
    """Another adapter gets its own export (never the previous one's); the same adapter again
    reuses its export; the same folder retrained is another adapter. MERGE=1 likewise."""
    one = cpu_chat.make_adapter("lora", "weights 1")
    _, calls = cpu_chat(LORA_PATH=one)
    first = [c for c in _tool_calls(calls) if "tools/convert_gguf.py" in c][0]
    _, calls = cpu_chat(LORA_PATH=one)
    assert not [c for c in _tool_calls(calls) if "tools/convert_gguf.py" in c]  # exists: skipped
    cpu_chat.make_adapter("lora", "weights 2")  # retrained in place
    _, calls = cpu_chat(LORA_PATH=one)
    again = [c for c in _tool_calls(calls) if "tools/convert_gguf.py" in c][0]
    assert again[again.index("--outfile") + 1] != first[first.index("--outfile") + 1]

    merged = {}
    for name, content in (("a", "A"), ("b", "B")):
        lora = cpu_chat.make_adapter(name, content)
        proc, calls = cpu_chat(LORA_PATH=lora, MERGE="1")
        tools = _tool_calls(calls)
        merge = [c for c in tools if "tools/merge_lora.py" in c][0]
        merged[name] = merge[merge.index("--output_path") + 1]
        conv = [c for c in tools if "tools/convert_gguf.py" in c][0]
        assert conv[conv.index("--model_path") + 1] == merged[name] and "--lora_path" not in conv
        assert conv[conv.index("--outtype") + 1] == "q8_0"
        chat_line = [line for line in proc.stderr.splitlines() if line.startswith("+ ")][-1]
        assert f"-m {conv[conv.index('--outfile') + 1]}" in chat_line and "--lora" not in chat_line
    assert merged["a"] != merged["b"]


def test_cpu_chat_uses_the_projects_venv_and_names_what_is_missing(cpu_chat, tmp_path):
    """PYTHON unset: the repository's .venv/bin/python; a missing module or interpreter is one line
    saying what to install, before anything runs."""
    repo = tmp_path / "repo"
    shutil.copytree(SCRIPTS_DIR, repo / "scripts")
    (repo / ".venv" / "bin").mkdir(parents=True)
    venv_python = repo / ".venv" / "bin" / "python"
    shutil.copy(cpu_chat.bin_dir / "python", venv_python)
    lora = cpu_chat.make_adapter("lora", "w")
    proc, calls = cpu_chat(repo / "scripts", PYTHON=None, LORA_PATH=lora, MISSING_MODULE="gguf")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {venv_python} cannot import gguf; run  make install  (creates .venv), or  "
        f"{venv_python} -m pip install -r requirements.txt"]
    assert [c[:2] for c in calls] == [["python", "-c"]]  # only the check ran, with the venv's python

    venv_python.unlink()
    proc, calls = cpu_chat(repo / "scripts", PYTHON=None, LORA_PATH=lora, PATH="/usr/bin:/bin")
    if shutil.which("python", path="/usr/bin:/bin") is None:
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
        assert "make install" in proc.stderr and calls == []

    proc, _ = cpu_chat(LORA_PATH=str(tmp_path / "no such adapter"))
    assert proc.returncode == 1 and "no such adapter folder" in proc.stderr


@pytest.mark.parametrize("script", ["finetune.sh", "generate.sh"])
def test_scripts_pick_the_venv_python(script, tmp_path):
    """common.sh: PYTHON unset means the repository's .venv/bin/python when there is one."""
    repo = tmp_path / "repo"
    shutil.copytree(SCRIPTS_DIR, repo / "scripts")
    (repo / ".venv" / "bin").mkdir(parents=True)
    stub = repo / ".venv" / "bin" / "python"
    stub.write_text(STUB.format(name="venv-python", unset=UNSET))
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    proc = subprocess.run(["bash", str(repo / "scripts" / script)], env=env, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split("\0")[0] == "venv-python"
