"""SFT packing: examples share a row but never see each other, and train exactly as if run alone."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import LF05_LORA, lf05_command, make_reference

from chipspan.args import parse_run_arguments
from chipspan.chips.placement import Placement
from chipspan.chips.span import SpannedModel
from chipspan.data import IGNORE_INDEX, Example, collate
from chipspan.data.packing import PackedExample, pack_examples
from chipspan.models.decoder import build_attention_mask, segment_positions
from chipspan.models.weights import load_pretrained
from chipspan.train.recipe import run_train

CUTOFF = 32


def random_examples(vocab, lengths, seed=0):
    """Random ids; the first third of each example is an untrained prompt."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]))
    return examples


def segments(block: PackedExample):
    """(start, stop) of each example in a packed block."""
    ids = torch.tensor(block.segment_ids)
    return [(int(i[0]), int(i[-1]) + 1) for i in (torch.nonzero(ids == s).flatten() for s in ids.unique())]


def token_losses(logits, labels):
    """Per-token next-token cross-entropy (b, s - 1), 0 where the label is -100."""
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none", ignore_index=IGNORE_INDEX
    )


def test_every_example_is_packed_once_within_cutoff():
    rng = random.Random(0)
    examples = random_examples(50, [rng.randint(1, CUTOFF) for _ in range(200)])
    blocks = pack_examples(examples, CUTOFF)
    assert pack_examples(examples, CUTOFF) == blocks  # deterministic
    assert all(len(b.input_ids) <= CUTOFF for b in blocks)
    unpacked = []
    for block in blocks:
        assert len(block.input_ids) == len(block.labels) == len(block.segment_ids)
        for start, stop in segments(block):
            assert block.labels[start] == IGNORE_INDEX  # nothing predicts across a boundary
            unpacked.append((tuple(block.input_ids[start:stop]), tuple(block.labels[start + 1 : stop])))
    assert sorted(unpacked) == sorted((tuple(e.input_ids), tuple(e.labels[1:])) for e in examples)
    total = sum(len(e.input_ids) for e in examples)
    assert len(blocks) <= -(-total // CUTOFF) + 1  # nearly as few blocks as possible
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_examples(random_examples(50, [CUTOFF + 1]), CUTOFF)


def test_packed_batch_carries_segments_and_plain_batch_is_unchanged():
    packed = pack_examples(random_examples(50, [3, 2]), 8)
    batch = collate(packed, pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 2, 2, 0, 0, 0]]
    assert segment_positions(batch["attention_mask"]).tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    mask = build_attention_mask(batch["attention_mask"], 8, 0)
    assert not mask[0, 0, 3, :3].any() and mask[0, 0, 4, 3:5].all()  # the 2nd example sees only itself

    plain = collate(random_examples(50, [3, 8]), pad_id=0)
    assert plain["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]
    assert segment_positions(plain["attention_mask"]).tolist() == [list(range(8))] * 2
    assert build_attention_mask(torch.ones(2, 8, dtype=torch.long), 8, 0) is None  # the fast path stays


LENGTHS = [9, 5, 14, 7, 3, 11, 30, 2, 13]


def packed_and_alone(tmp_path, variant="llama3-gqa-rope-llama3", lengths=LENGTHS, cutoff=CUTOFF):
    """(reference HF model, folder of the same weights, examples, their packed blocks)."""
    ref, folder = make_reference(tmp_path, variant)
    examples = random_examples(ref.config.vocab_size, lengths)
    return ref, folder, examples, pack_examples(examples, cutoff)


def example_rows(examples, blocks):
    """For each example, (row, start, stop) of its tokens in the packed batch."""
    where = {tuple(b.input_ids[s:e]): (row, s, e) for row, b in enumerate(blocks) for s, e in segments(b)}
    return [where[tuple(e.input_ids)] for e in examples]


def test_packed_loss_and_gradients_equal_examples_run_alone(tmp_path):
    _, folder, examples, blocks = packed_and_alone(tmp_path)
    alone, packed = load_pretrained(folder), load_pretrained(folder)
    batch = collate(blocks, pad_id=0)
    assert batch["input_ids"].shape[0] < len(examples) // 2

    out = packed(batch["input_ids"], batch["labels"], batch["attention_mask"])
    per_token = token_losses(out.logits, batch["labels"])
    scored = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    (out.loss * scored).backward()  # the summed loss

    total = 0.0
    for example, (row, start, stop) in zip(examples, example_rows(examples, blocks)):
        ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
        result = alone(ids, labels)
        count = int((labels[:, 1:] != IGNORE_INDEX).sum())
        (result.loss * count).backward()
        total += result.loss.item() * count
        own_sum = token_losses(result.logits, labels).sum()
        assert abs(per_token[row, start : stop - 1].sum() - own_sum) <= 1e-5 * max(1.0, own_sum.item())
    assert abs(out.loss.item() * scored - total) <= 1e-5 * total
    packed_grads = dict(packed.named_parameters())
    for name, param in alone.named_parameters():
        assert torch.allclose(packed_grads[name].grad, param.grad, atol=1e-5, rtol=1e-5), name


def test_packed_batch_over_two_chips_equals_one_model_unpacked(tmp_path):
    """The segment mask and positions reach the second stage: loss and gradients match."""
    _, folder, examples, blocks = packed_and_alone(tmp_path)
    placement = Placement((torch.device("cpu"),) * 2, (range(0, 2), range(2, 3)))
    spanned = SpannedModel.load(folder, placement, torch.float32)
    whole = load_pretrained(folder)
    batch = collate(blocks, pad_id=0)
    loss = spanned(batch["input_ids"], batch["labels"], batch["attention_mask"])
    loss.backward()

    plain = collate(examples, pad_id=0)
    reference = whole(plain["input_ids"], plain["labels"], plain["attention_mask"]).loss
    reference.backward()
    assert abs(loss.item() - reference.item()) <= 1e-5 * reference.item()
    whole_grads = dict(whole.named_parameters())
    for stage in spanned.stages:
        for name, param in stage.named_parameters():
            assert torch.allclose(param.grad, whole_grads[name].grad, atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize(
    "variant,lengths,cutoff",
    [
        ("llama3-gqa-rope-llama3", LENGTHS, CUTOFF),
        ("qwen2-qkv-bias", LENGTHS, CUTOFF),
        # three full rows of 24 > max_position_embeddings (16): dynamic rope would scale them unless
        # positions restart per example, and no example alone is longer than 16
        ("llama-rope-dynamic-beyond-max", [16, 8, 12, 12, 10, 14], 24),
    ],
)
def test_packed_logits_match_transformers_one_example_at_a_time(tmp_path, variant, lengths, cutoff):
    ref, folder, examples, blocks = packed_and_alone(tmp_path, variant, lengths, cutoff)
    if variant == "llama-rope-dynamic-beyond-max":
        assert all(len(b.input_ids) == cutoff for b in blocks)
    ours = load_pretrained(folder)
    batch = collate(blocks, pad_id=0)
    with torch.no_grad():
        logits = ours(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for example, (row, start, stop) in zip(examples, example_rows(examples, blocks)):
            expected = ref(input_ids=torch.tensor([example.input_ids])).logits[0]
            assert torch.allclose(logits[row, start:stop], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flag", ["--packing", "--sft_packing"])
def test_training_with_packing_runs_and_writes_outputs(lf05_workspace, tmp_path, flag):
    out = tmp_path / "out"
    argv = lf05_command(
        LF05_LORA,
        lf05_workspace,
        out,
        flag,
        "true",
        "--max_steps",
        "2",
        "--max_samples",
        "16",
        "--cutoff_len",
        "256",
        "--save_steps",
        "0",
    )
    messages = []
    run_train(parse_run_arguments(argv, {}), report=messages.append)
    line = next(m for m in messages if m.startswith("packed"))
    assert line.startswith("packed 16 examples into ") and "blocks of ≤ 256 tokens (fill" in line
    assert [json.loads(x)["current_steps"] for x in (out / "trainer_log.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "adapter_model.safetensors").is_file() and (out / "train_results.json").is_file()
