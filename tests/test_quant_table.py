"""tools/quant_table.py (issue 15's perplexity table): the parts that need no model. The table
itself takes an hour of CPU (docs/performance.md has it and the commands)."""

from __future__ import annotations

import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))

import quant_table  # noqa: E402
import quantize  # noqa: E402


def test_every_row_is_ordered_and_has_its_own_folder():
    assert set(quant_table.ORDER) == set(quant_table.ROWS)
    folders = [quant_table.folder_name(arg) for _, kind, arg in quant_table.ROWS.values() if kind == "folder"]
    assert len(folders) == len(set(folders))


def test_quantize_commands(tmp_path):
    rtn = quant_table.quantize_command(quant_table.ROWS["rtn4"][2], str(tmp_path / "r"), 128, 512)
    assert "--nsamples" not in rtn and "--calib_data" not in rtn and rtn[rtn.index("--group_size") + 1] == "64"
    quantize.build_parser().parse_args(rtn[2:])  # flags the tool takes
    en = quant_table.quantize_command(quant_table.ROWS["gptq4en"][2], str(tmp_path / "g"), 64, 512)
    calib = en[en.index("--calib_data") + 1]
    assert os.path.dirname(calib) == str(tmp_path) and en[en.index("--nsamples") + 1] == "64"
    records = [json.loads(line) for line in open(calib, encoding="utf-8")]
    assert len(records) == 154  # the English half of sample/instruct/data_sample.jsonl
    assert not any("\u4e00" <= c <= "\u9fff" for r in records for c in json.dumps(r, ensure_ascii=False))
