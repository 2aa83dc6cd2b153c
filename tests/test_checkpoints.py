"""checkpoints.py: the one sharded safetensors writer, --max_shard_size, and atomic publishing.

The writer's files are read back with the safetensors library (an independent reader); shard and
index names are compared with Hugging Face's layout literally. Publishing is checked by what is on
disk after success, after a failure half-way, and when something is in the way.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import checkpoints
from checkpoints import (INDEX_NAME, check_new_folder, parse_size, plan_shards, publish_file, publish_folder,
                         read_safetensors_tensor, staging_file, staging_folder, write_sharded_safetensors,
                         write_text_atomically)
from errors import UserError


def tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(10, 10, generator=g),                     # 400 bytes
            "b.weight": torch.randn(30, 10, generator=g).to(torch.bfloat16),  # 600 bytes
            "c.bias": torch.randn(10, generator=g).to(torch.float16),         # 20 bytes
            "d.steps": torch.arange(7, dtype=torch.int64),                    # 56 bytes
            "e.weight": torch.randn(5, 10, generator=g)}                      # 200 bytes


def write(folder, max_bytes, order=None):
    src = tensors()
    produced = []

    def produce(name):
        produced.append(name)
        return src[name].clone()

    names = order or list(src)
    files = write_sharded_safetensors(str(folder), [(n, tuple(src[n].shape), src[n].dtype) for n in names], produce,
                                      max_bytes)
    return src, files, produced


# --- --max_shard_size --------------------------------------------------------------------------------


def test_parse_size_units():
    assert [parse_size(s) for s in ("2GB", "500MiB", "1000", "1.5 gb", "1e3KB", ".5KiB", " 3 tb ", "1B")] == [
        2 * 10**9, 500 * 2**20, 1000, 15 * 10**8, 10**6, 512, 3 * 10**12, 1]


@pytest.mark.parametrize("size", ["nan", "inf", "-1", "0", "0.5", "2XB", "GB", "1e400", "2 G B", "0x10", ""])
def test_parse_size_refuses(size):
    with pytest.raises(UserError) as e:
        parse_size(size, "--max_shard_size")
    assert str(e.value).startswith(f"--max_shard_size {size!r}: expected a positive size")


def test_plan_shards_is_greedy_in_order():
    sizes = [("a", 400), ("b", 600), ("c", 20), ("d", 56), ("e", 200)]
    assert plan_shards(sizes, 10**6) == [["a", "b", "c", "d", "e"]]
    assert plan_shards(sizes, 1000) == [["a", "b"], ["c", "d", "e"]]
    assert plan_shards(sizes, 500) == [["a"], ["b"], ["c", "d", "e"]]  # b alone is over the limit: its own shard
    assert plan_shards(sizes, 1) == [["a"], ["b"], ["c"], ["d"], ["e"]]


# --- the sharded writer ------------------------------------------------------------------------------


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    from safetensors.torch import load_file

    src, files, produced = write(tmp_path, 10**6)
    assert files == ["model.safetensors"] and sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert produced == list(src)
    back = load_file(str(tmp_path / "model.safetensors"))
    assert set(back) == set(src)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_shards_and_index_in_hugging_face_layout(tmp_path):
    from safetensors.torch import load_file

    src, files, produced = write(tmp_path, 500)
    shards = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
              "model-00003-of-00003.safetensors"]
    assert files == shards + [INDEX_NAME] and sorted(os.listdir(tmp_path)) == sorted(files)
    assert produced == list(src)  # each tensor made once, in order
    index = json.load(open(tmp_path / INDEX_NAME))
    assert index == {"metadata": {"total_size": 400 + 600 + 20 + 56 + 200},
                     "weight_map": {"a.weight": shards[0], "b.weight": shards[1], "c.bias": shards[2],
                                    "d.steps": shards[2], "e.weight": shards[2]}}
    for shard in shards:
        back = load_file(str(tmp_path / shard))
        assert set(back) == {n for n, f in index["weight_map"].items() if f == shard}
        for name, t in back.items():
            assert t.dtype == src[name].dtype and torch.equal(t, src[name]), name
    assert torch.equal(read_safetensors_tensor(str(tmp_path / shards[2]), "e.weight"), src["e.weight"])


def test_writer_refuses_a_tensor_that_is_not_the_planned_one(tmp_path):
    with pytest.raises(RuntimeError, match=r"x: produced \(2, 3\) torch.float32, planned \(3, 2\)"):
        write_sharded_safetensors(str(tmp_path), [("x", (3, 2), torch.float32)], lambda n: torch.zeros(2, 3), 100)


def test_truncated_file_is_a_one_line_error(tmp_path):
    write(tmp_path, 10**6)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"model.safetensors: truncated file; e.weight is incomplete"):
        read_safetensors_tensor(str(path), "e.weight")


def test_finite_checks():
    ok = {"w": torch.ones(3), "steps": torch.arange(3)}
    checkpoints.check_finite(ok, "f.safetensors")
    bad = {"w": torch.ones(3), "v": torch.tensor([1.0, float("inf")]), "u": torch.tensor([float("nan")])}
    assert checkpoints.nonfinite_tensors(bad) == ["v", "u"]
    with pytest.raises(UserError, match=r"^f.safetensors: 2 of 3 tensors hold NaN or infinite values \(e.g. v\); fix$"):
        checkpoints.check_finite(bad, "f.safetensors", "fix")
    assert checkpoints.all_close(0.5, 1.0) and not checkpoints.all_close(float("nan"), 1.0)


# --- publishing --------------------------------------------------------------------------------------


def test_staged_folder_is_published_whole(tmp_path):
    out = tmp_path / "model"
    check_new_folder(str(out), "--output_path")
    with staging_folder(str(out)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".model.partial-")
        write(tmp, 500)
        assert publish_folder(tmp, str(out), "--output_path") is True
    assert sorted(os.listdir(tmp_path)) == ["model"] and len(os.listdir(out)) == 4

    with pytest.raises(UserError, match="already exists and is not empty"):
        check_new_folder(str(out), "--output_path")
    (tmp_path / "empty").mkdir()
    check_new_folder(str(tmp_path / "empty"), "--output_path")  # an empty folder may be filled


def test_publish_folder_never_replaces_what_is_there(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    with staging_folder(str(out)) as tmp:
        write(tmp, 10**6)
        with pytest.raises(UserError, match="cannot move the finished output into place"):
            publish_folder(tmp, str(out), "--output_path")
        assert publish_folder(tmp, str(out), "cache", exist_ok=True) is False  # another process was first
    assert os.listdir(out) == ["mine.txt"] and sorted(os.listdir(tmp_path)) == ["model"]  # staging removed


def test_failure_while_staging_leaves_nothing(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(OSError):
        with staging_folder(str(out)) as tmp:
            write(tmp, 500)
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == []


def test_single_files_are_replaced_whole(tmp_path):
    path = tmp_path / "Modelfile"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with staging_file(str(path)) as tmp:
            assert os.path.basename(tmp).startswith(".Modelfile.partial-")
            open(tmp, "w").write("half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["Modelfile"] and path.read_text() == "old\n"

    write_text_atomically(str(path), "FROM ./m.gguf\n")
    assert os.listdir(tmp_path) == ["Modelfile"] and path.read_text() == "FROM ./m.gguf\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600

    with staging_file(str(tmp_path / "new" / "m.gguf")) as tmp:  # the folder is created
        open(tmp, "wb").write(b"GGUF")
        publish_file(tmp, str(tmp_path / "new" / "m.gguf"))
    assert os.listdir(tmp_path / "new") == ["m.gguf"]
