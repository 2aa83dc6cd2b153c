"""Writing weights safely, for the trainer and tools/: finite checks, sharded safetensors, atomic publishing.

Two promises every writer in the project keeps:
- no non-finite weights are saved, loaded, merged or exported (`check_finite`, `is_finite`);
- what a user can load is either complete or absent: it is written under a temporary name beside
  its destination and renamed into place. A new folder is staged whole and renamed in one step
  (`staging_folder` + `publish_folder`); files added to an existing folder are moved in one by one,
  the file that marks the folder as loadable (e.g. adapter_config.json) last (`publish_files`); a
  single file is staged beside its destination (`staging_file` + `publish_file`).

The one sharded safetensors writer is here too (`write_sharded_safetensors`, Hugging Face's layout:
`model.safetensors`, or `model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`): it
streams, one tensor in memory at a time, and reads `--max_shard_size` (`parse_size`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager

from errors import UserError, logger, one_line

DTYPES = ("float16", "bfloat16", "float32")  # what the tools save (--dtype)
INDEX_NAME = "model.safetensors.index.json"  # which shard holds which tensor, when there are several

# --- finite weights --------------------------------------------------------------------------------


def is_finite(t) -> bool:
    """No NaN or infinity in a tensor; checked in slices so a large tensor costs little extra memory."""
    import torch

    if not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    step = 1 << 24
    return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    import torch

    return [name for name, value in tensors.items() if isinstance(value, torch.Tensor) and not is_finite(value)]


def check_finite(tensors: dict, source: str, hint: str = "") -> None:
    """Raise a one-line UserError when any tensor of `tensors` holds a NaN or an infinity."""
    bad = nonfinite_tensors(tensors)
    if bad:
        raise UserError(f"{source}: {len(bad)} of {len(tensors)} tensors hold NaN or infinite values "
                        f"(e.g. {bad[0]}){'; ' + hint if hint else ''}")


def all_close(diff: float, tolerance: float) -> bool:
    """`diff <= tolerance`, false for a NaN difference (`nan > tol` is false too, so never test that)."""
    return diff == diff and diff <= tolerance


# --- the safetensors format, one tensor at a time ---------------------------------------------------
#
# A file is: u64 header length | JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]},
# "__metadata__": {...}} | raw little-endian data, offsets counted from the end of the header.


def safetensors_dtypes() -> dict:
    """safetensors' dtype names -> torch dtypes."""
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}


def element_size(dtype) -> int:
    import torch

    return torch.tensor([], dtype=dtype).element_size()


def read_safetensors_tensor(path: str, name: str):
    """One tensor of a safetensors file, read with plain file reads into a fresh tensor.

    Not get_tensor of a memory-mapped handle: its pages count as resident while the copy is made,
    so reading a 125 MiB tensor would briefly cost 250 MiB.
    """
    import torch

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(n))[name]
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=safetensors_dtypes()[info["dtype"]])
        f.seek(8 + n + begin)
        view = out.reshape(-1).view(torch.uint8).numpy()
        if f.readinto(memoryview(view)) != end - begin:
            raise UserError(f"{path}: truncated file; {name} is incomplete")
    return out


def write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...], object]], produce) -> int:
    """Write a safetensors file one tensor at a time; returns its data size in bytes.

    `entries` is [(name, shape, torch dtype)] in file order; `produce(name)` returns each tensor
    just before it is written. safetensors' own save_file takes a dict of every tensor and copies
    them into one buffer, which would hold two copies of a shard; the format lets us stream instead.
    """
    import torch

    names_of = {v: k for k, v in safetensors_dtypes().items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * element_size(dtype)
        header[name] = {"dtype": names_of[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in entries:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned {tuple(shape)} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t  # before the next produce(): never two tensors alive at once
    return offset


# --- sharded checkpoints ---------------------------------------------------------------------------

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, flag: str = "--max_shard_size") -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000 (bytes); at least one byte.

    Only plain decimal numbers: nan, inf, negative numbers, 0 and unknown units are one-line errors.
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:E([+-]?[0-9]{1,3}))?\s*([A-Z]*)\s*", str(text).upper())
    nbytes = float("nan")
    if m and m.group(3) in SIZE_UNITS:
        nbytes = float(f"{m.group(1)}e{m.group(2) or 0}") * SIZE_UNITS[m.group(3)]  # 1e400 -> inf
    if not (math.isfinite(nbytes) and nbytes >= 1):
        raise UserError(f"{flag} {text!r}: expected a positive size such as 2GB, 500MB, 1GiB or 1000000 (bytes)")
    return int(nbytes)


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards, in the given order: a new shard starts when the next
    tensor would take the current one past max_bytes (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for name, nbytes in sizes:
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_name(i: int, n: int) -> str:
    """Hugging Face's name of shard i (0-based) of n."""
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_sharded_safetensors(folder: str, entries: list[tuple[str, tuple[int, ...], object]], produce,
                              max_bytes: int) -> list[str]:
    """Write the tensors `entries` [(name, shape, torch dtype)] into `folder` as shards of at most
    max_bytes, plus INDEX_NAME when there are several; returns the file names written.

    `produce(name)` makes each tensor just before it is written, so one tensor is in memory at a
    time, whatever the model size. `folder` is a staging folder (see `staging_folder`).
    """
    shapes = {name: (shape, dtype) for name, shape, dtype in entries}
    plan = plan_shards([(name, math.prod(shape) * element_size(dtype)) for name, shape, dtype in entries], max_bytes)
    weight_map, total, files = {}, 0, []
    for i, group in enumerate(plan):
        fname = shard_file_name(i, len(plan))
        total += write_safetensors(os.path.join(folder, fname), [(n, *shapes[n]) for n in group], produce)
        weight_map.update({n: fname for n in group})
        files.append(fname)
        logger.info("wrote %s (%d tensors)", fname, len(group))
    if len(plan) > 1:
        with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
            f.write("\n")
        files.append(INDEX_NAME)
    return files


# --- publishing: complete or absent ----------------------------------------------------------------


def check_new_folder(path: str, flag: str) -> None:
    """`path` may be created (or is an empty folder): nothing the user has is ever replaced."""
    if os.path.lexists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UserError(f"{flag} {path} already exists and is not empty; pass a new folder (nothing is overwritten)")


@contextmanager
def staging_folder(destination: str):
    """A fresh hidden folder beside `destination` (same file system, so renames are atomic);
    removed on exit, whatever happens."""
    parent = os.path.dirname(os.path.abspath(destination)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(destination))}.partial-", dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(staged: str, path: str, flag: str, exist_ok: bool = False) -> bool:
    """Rename the finished `staged` folder to `path` in one step, so `path` is either absent or
    complete; an empty folder at `path` is replaced. Returns True.

    Something created at `path` meanwhile is kept (rename() replaces only an empty folder): a
    one-line UserError, or, with `exist_ok` (a cache another process filled first), False.
    """
    for name in os.listdir(staged):
        if os.path.isfile(os.path.join(staged, name)):
            _fsync(os.path.join(staged, name))
    try:
        os.rename(staged, path)
    except OSError as e:
        if exist_ok and os.path.isdir(path):
            return False
        raise UserError(f"{flag} {path}: cannot move the finished output into place ({e.strerror}); "
                        "something else created it meanwhile? nothing was overwritten") from None
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return True


def publish_files(staged: str, destination: str, last: str | None = None, keep_existing: tuple[str, ...] = ()) -> list[str]:
    """Move every file of `staged` into `destination`, `last` after all the others.

    `last` (the marker a loader looks for) is removed from `destination` first, so a crash at any
    point leaves either no marker or a marker beside complete files. Names in `keep_existing` are
    not moved when `destination` already has a file of that name (e.g. a user's README.md).
    Returns the names published.
    """
    os.makedirs(destination, exist_ok=True)
    names = sorted(n for n in os.listdir(staged) if os.path.isfile(os.path.join(staged, n)))
    if last is not None and os.path.lexists(os.path.join(destination, last)):
        os.remove(os.path.join(destination, last))
    moved = []
    for name in [n for n in names if n != last] + ([last] if last in names else []):
        target = os.path.join(destination, name)
        if name in keep_existing and os.path.lexists(target):
            continue
        _fsync(os.path.join(staged, name))
        os.replace(os.path.join(staged, name), target)
        moved.append(name)
    _fsync_dir(destination)
    return moved


@contextmanager
def staging_file(destination: str):
    """A fresh, empty hidden file beside `destination` (".NAME.partial-XXXXXX"), to be written and
    then moved into place with `publish_file`; removed on exit if it is still there."""
    parent = os.path.dirname(os.path.abspath(destination))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(destination)}.partial-", dir=parent)
    os.close(fd)
    try:
        yield tmp
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def publish_file(staged: str, path: str) -> None:
    """Give a finished staged file the mode a plain open() would (mkstemp makes it private) and
    rename it over `path` in one step."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o666 & ~umask)
    _fsync(staged)
    os.replace(staged, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_text_atomically(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a staged file: the old file or the new one, never half."""
    with staging_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        publish_file(tmp, path)


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- reading what a checkpoint holds, with one-line errors ----------------------------------------


def read_json_file(path: str, kind: type = dict):
    """A JSON file that must hold a `kind` (dict or list); one-line errors naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); the file is damaged") from None
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise UserError(f"{path}: cannot be read as JSON ({one_line(e)}); the file is damaged") from None
    if not isinstance(value, kind):
        raise UserError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, got "
                        f"{type(value).__name__}; the file is damaged")
    return value


def read_tensor_file(path: str) -> dict:
    """All tensors of a safetensors or (weights-only) torch file, or a one-line error."""
    import torch

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt files, pickles with code objects
        raise UserError(f"{path}: cannot be read as a tensor file ({one_line(e)}); it is truncated or "
                        "damaged") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: holds a {type(raw).__name__}, not a dict of tensors")
    return raw


# --- a training run's folder: checkpoint names, what a run may replace, what can be resumed -------

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LEGACY_ADAPTER_WEIGHTS = ("adapter_model.bin", "pytorch_model.bin")  # Chinese-Vicuna / old peft
TRAINING_CONFIG = "training_config.json"  # template name + resolved hyperparameters

# The files a finished run puts at the top of --output_path; --overwrite_output_dir replaces these
# and nothing else (a user's README.md stays).
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, TRAINING_CONFIG, "loss.png")
# What a run appends to while it trains (train.py): --overwrite_output_dir empties them, a resumed run
# appends. TensorBoard's runs/ folder (a new runs/DATE_HOST per run) is left as it is.
TRAINER_LOG = "trainer_log.jsonl"  # one line per event: progress for the training page
SAMPLES_LOG = "samples.jsonl"  # --eval_prompts answers at each evaluation
RUN_LOGS = (TRAINER_LOG, SAMPLES_LOG)
CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")


def checkpoints_in(folder: str) -> list[str]:
    found = [n for n in os.listdir(folder) if CHECKPOINT_DIR.fullmatch(n) and os.path.isdir(os.path.join(folder, n))]
    return sorted(found, key=lambda n: int(n.split("-")[1]))


def listing(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def check_output_folder(out: str, resume_from: str | None = None, overwrite: bool = False) -> None:
    """Refuse an --output_path that holds something, unless the run continues a checkpoint in it
    (`resume_from`) or `overwrite` (--overwrite_output_dir) replaces an earlier run of ours."""
    if not out or not out.strip():
        raise UserError("--output_path is empty; pass a folder name, e.g. --output_path lora-Vicuna")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_path {out} is a file; pass a folder")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--output_path {out}: {existing} is a file, so no folder can be made there; pass another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output_path {out}: {existing} is not writable; pass a folder you can write to")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    entries = sorted(os.listdir(out))
    checkpoints = checkpoints_in(out)
    if resume_from:
        parent = os.path.dirname(os.path.abspath(resume_from))
        if os.path.realpath(parent) == os.path.realpath(out):
            return  # continuing the run this folder holds
        raise UserError(f"--output_path {out} is not empty ({listing(entries)}) and "
                        f"--resume_from_checkpoint {resume_from} belongs to another folder; "
                        f"pass --output_path {parent} to continue that run there, or a new folder")
    if overwrite:
        for name in RUN_LOGS:
            path = os.path.join(out, name)
            if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
                raise UserError(f"--output_path {out}: {name} is not a file a run of finetune.py wrote (a folder "
                                "or link); --overwrite_output_dir replaces only an earlier run's own files: move it "
                                "away or pass a new --output_path")
        for name in checkpoints:  # only checkpoints an earlier run of ours wrote may be replaced
            stray = not_ours(os.path.join(out, name))
            if stray:
                raise UserError(f"--output_path {out}: {name} was not written by finetune.py ({stray}); "
                                "--overwrite_output_dir replaces only an earlier run's own files: move it "
                                "away or pass a new --output_path")
        return
    if checkpoints:
        what = "already holds an adapter and the" if ADAPTER_CONFIG in entries else "holds"
        raise UserError(f"--output_path {out} {what} checkpoints of an earlier run ({listing(checkpoints)}); pass "
                        f"--resume_from_checkpoint {os.path.join(out, checkpoints[-1])} to continue it, a new "
                        "--output_path, or --overwrite_output_dir to replace that run's checkpoints and adapter")
    what = "already holds an adapter" if ADAPTER_CONFIG in entries else "is not empty"
    raise UserError(f"--output_path {out} {what} ({listing(entries)}); pass a new or empty folder, or "
                    "--overwrite_output_dir to replace only an earlier run's adapter files and logs in it "
                    "(nothing else is touched)")


# Every file a checkpoint-N folder of ours holds (the Trainer's and our training_config.json).
OUR_CHECKPOINT_FILE = re.compile(r"adapter_model\.safetensors|adapter_config\.json|README\.md|training_args\.bin|"
                                 r"optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|"
                                 r"trainer_state\.json|training_config\.json")


def not_ours(checkpoint: str) -> str | None:
    """Why a checkpoint-N folder is not one finetune.py wrote (None when it is)."""
    names = os.listdir(checkpoint)
    if TRAINING_CONFIG not in names or "trainer_state.json" not in names:
        return f"it has no {TRAINING_CONFIG} and trainer_state.json"
    stray = [n for n in names if not OUR_CHECKPOINT_FILE.fullmatch(n) or not os.path.isfile(os.path.join(checkpoint, n))]
    return f"it holds {listing(sorted(stray))}" if stray else None


def remove_earlier_checkpoints(out: str) -> None:
    """--overwrite_output_dir: an earlier run's checkpoints go before this run writes its own, so the
    two runs never mix (the Trainer's rotation and resume would take one for the other). Only files
    of the checked checkpoint layout are removed."""
    for name in checkpoints_in(out):
        folder = os.path.join(out, name)
        if not_ours(folder):
            continue
        for file in os.listdir(folder):
            os.remove(os.path.join(folder, file))
        os.rmdir(folder)
        logger.info("--overwrite_output_dir: removed %s of the earlier run", folder)


def reset_run_logs(out: str) -> None:
    """--overwrite_output_dir: empty an earlier run's trainer_log.jsonl and samples.jsonl (checked to
    be plain files by check_output_folder), so the new run's lines are not mixed with its."""
    for name in RUN_LOGS:
        path = os.path.join(out, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            logger.info("--overwrite_output_dir: removed %s of the earlier run", path)


CHECKPOINT_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "trainer_state.json", "optimizer.pt", "scheduler.pt")


def check_resume_checkpoint(path: str, lora_r: int, lora_alpha: int, targets) -> None:
    """A --resume_from_checkpoint folder that the Trainer can continue, checked before any model
    loads: every file present and readable, and the LoRA shape the flags ask for."""
    flag = f"--resume_from_checkpoint {path}"
    if not os.path.isdir(path):
        raise UserError(f"{flag}: no such directory; pass a checkpoint-N folder inside an earlier --output_path")
    missing = [n for n in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, n))]
    if missing:
        parent = os.path.dirname(os.path.abspath(path))
        complete = [c for c in checkpoints_in(parent)
                    if all(os.path.isfile(os.path.join(parent, c, n)) for n in CHECKPOINT_FILES)]
        hint = (f"the latest complete one is {os.path.join(os.path.dirname(path), complete[-1])}" if complete
                else "pass a checkpoint-N folder finetune.py wrote")
        raise UserError(f"{flag}: not a complete checkpoint (no {', '.join(missing)}); {hint}")
    state = read_json_file(os.path.join(path, "trainer_state.json"), dict)
    if not isinstance(state.get("global_step"), int):
        raise UserError(f"{os.path.join(path, 'trainer_state.json')}: no integer global_step; the checkpoint is damaged")
    config = read_json_file(os.path.join(path, ADAPTER_CONFIG), dict)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    check_finite(read_tensor_file(weights), weights, "the run that wrote it diverged: resume from an earlier "
                 "checkpoint-N or retrain with a lower --learning_rate")
    import torch

    for name in ("optimizer.pt", "scheduler.pt"):
        try:
            torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, not a torch file
            raise UserError(f"{os.path.join(path, name)}: cannot be read ({one_line(e)}); the checkpoint is "
                            "damaged: resume from an earlier checkpoint-N") from None
    if lora_r != config.get("r") or lora_alpha != config.get("lora_alpha"):
        raise UserError(f"{flag}: the checkpoint is a LoRA of r={config.get('r')}, lora_alpha={config.get('lora_alpha')} "
                        f"but the flags ask for --lora_r {lora_r} --lora_alpha {lora_alpha}; "
                        "pass the flags of the run that wrote it")
    saved = config.get("target_modules")
    if targets != "all-linear" and sorted(targets) != sorted(saved if isinstance(saved, list) else [saved]):
        raise UserError(f"{flag}: the checkpoint's LoRA targets {saved} but --lora_target_modules is "
                        f"{','.join(targets)}; pass the flags of the run that wrote it")
