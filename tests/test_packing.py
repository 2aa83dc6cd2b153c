"""The fast training path: packed rows and a loss computed only at supervised positions must give
exactly the loss of the same examples run one by one through the model's own loss."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening

from conftest import INSTRUCT_RECORDS
from prompt import IGNORE_INDEX, Conversation, build_example
from train import PACKED_ATTENTION, supervised_token_loss, use_packed_attention


def examples(tokenizer, prompt_type="instruct"):
    convs = [Conversation(turns=[(r["instruction"], r["output"])], input=r.get("input", "")) for r in INSTRUCT_RECORDS]
    convs.append(Conversation(turns=[("你好", "你好！"), ("2+2?", "4"), ("and 3+3?", "6")]))
    out = []
    for conv in convs:
        pt = "chat" if len(conv.turns) > 1 else prompt_type
        out.append(build_example(pt, conv, tokenizer, 256))
    return out


def flatten(exs):
    """The packed batch finetune.py trains on: one row, restarting position ids, sequence bounds."""
    return DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=True,
                                      separator_id=IGNORE_INDEX)(exs)


@pytest.mark.parametrize("kind,attention", [("bpe", "sdpa"), ("sp", "sdpa"), ("bpe", PACKED_ATTENTION),
                                            ("sp", PACKED_ATTENTION)])
def test_packed_loss_equals_one_by_one(tiny_models, kind, attention):
    from models import load_tokenizer

    tokenizer = load_tokenizer(tiny_models[kind])
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.float32).eval()
    if attention == PACKED_ATTENTION:
        use_packed_attention(model)  # one causal SDPA per example; padded batches keep the masked path
        assert model.config._attn_implementation == PACKED_ATTENTION
    exs = examples(tokenizer)
    reference_sum, reference_count = 0.0, 0
    with torch.no_grad():
        for ex in exs:  # the model's own loss (mean over shifted supervised tokens), one example a row
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor([ex["labels"]])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            reference_sum += float(model(input_ids=ids, labels=labels).loss) * n
            reference_count += n
        packed = flatten(exs)
        assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
        assert packed["cu_seq_lens_q"].tolist()[-1] == packed["input_ids"].shape[1]
        total, count = supervised_token_loss(model, packed)
        padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                        return_tensors="pt")(exs)
        total_padded, count_padded = supervised_token_loss(model, dict(padded))
    assert count == count_padded == reference_count
    torch.testing.assert_close(float(total), reference_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(float(total_padded), reference_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", PACKED_ATTENTION])
def test_gradients_match_the_models_own_loss(tiny_models, attention):
    from models import load_tokenizer

    tokenizer = load_tokenizer(tiny_models["sp"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["sp"], dtype=torch.float32)
    if attention == PACKED_ATTENTION:
        use_packed_attention(model)
    exs = examples(tokenizer)[:3]
    packed = flatten(exs)
    total, count = supervised_token_loss(model, packed, chunk_size=7)  # several checkpointed chunks
    (total / count).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = 0
    for ex in exs:
        labels = torch.tensor([ex["labels"]])
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        reference = reference + model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss * n
    (reference / count).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """tools/gpu_check.py end to end on a tiny model on the CPU (the GPU run uses the same code)."""
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, f"{ROOT}/tools/gpu_check.py", "--dry-run", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.count(" steps ") == 6 and "ours 8bit / recipe 8bit:" in out.stdout


def test_no_packing_groups_batches_by_length(tiny_models, tmp_path):
    """--no-packing pads each batch to its longest example; length grouping (the default there)
    puts similar lengths together, so the padded batches carry little padding."""
    import random

    from transformers.trainer_pt_utils import LengthGroupedSampler

    import train
    import train_args
    from models import load_tokenizer

    tokenizer = load_tokenizer(tiny_models["sp"])
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["sp"], dtype=torch.float32)
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(400)]
    exs = [{"input_ids": [7] * n, "labels": [IGNORE_INDEX] * (n // 2) + [7] * (n - n // 2)} for n in lengths]

    def computed_tokens(*flags):
        args = train_args.build_parser(train_args.DEFAULTS).parse_args(
            ["--output_path", str(tmp_path / "out"), "--micro_batch_size", "4", "--batch_size", "4", "--no-packing",
             *flags])
        trainer = train.make_trainer(args, train.Plan.from_args(args), model, tokenizer, exs, [])
        batches = list(trainer.get_train_dataloader())
        assert sorted(n for b in batches for n in (b["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()) == \
            sorted(n - n // 2 for n in lengths)  # every example once, labels intact
        return trainer, sum(b["input_ids"].numel() for b in batches)

    trainer, grouped = computed_tokens()
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    _, shuffled = computed_tokens("--no-group_by_length")
    real = sum(lengths)
    assert grouped - real < 0.25 * (shuffled - real), (real, grouped, shuffled)


@pytest.mark.gpu
def test_packed_flash_attention_loss_equals_one_by_one(tiny_models):
    """On a GPU with flash-attn, finetune.py trains packed rows with varlen flash-attention: the
    loss must still be the examples' own loss, run one by one (bf16 tolerance)."""
    from transformers.utils import is_flash_attn_2_available

    from models import load_tokenizer

    if not is_flash_attn_2_available():
        pytest.skip("flash-attn is not installed")
    tokenizer = load_tokenizer(tiny_models["bpe"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["bpe"], dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda().eval()
    exs = examples(tokenizer)
    with torch.no_grad():
        reference_sum, reference_count = 0.0, 0
        for ex in exs:
            ids, labels = torch.tensor([ex["input_ids"]]).cuda(), torch.tensor([ex["labels"]]).cuda()
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            reference_sum += float(model(input_ids=ids, labels=labels).loss) * n
            reference_count += n
        packed = {k: v.cuda() if torch.is_tensor(v) else v for k, v in flatten(exs).items()}
        total, count = supervised_token_loss(model, packed)
    assert count == reference_count
    torch.testing.assert_close(float(total), reference_sum, rtol=2e-2, atol=1e-2)
