"""The one loss normalisation: packing, padding and micro-batching do not change the loss or its gradients."""

import torch

from align.core.losses import count_targets, normalised_loss, summed_token_loss
from base_model import QwenForCausalLM
from conftest import tiny_config
from sft.data import collate, pack_examples


def _examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 20, (1,), generator=g))
        ids = torch.randint(0, 300, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def _model():
    torch.manual_seed(0)
    return QwenForCausalLM(tiny_config(initializer_range=0.05))


def test_summed_loss_by_hand():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 1.0
    labels = torch.tensor([[-100, 2, -100]])
    expected = -torch.log_softmax(torch.tensor([0.0, 0, 1, 0]), -1)[2]
    assert torch.isclose(summed_token_loss(logits, labels), expected)
    assert count_targets(labels) == 1


def test_packed_batch_loss_equals_token_weighted_unpadded_loss():
    model, examples = _model(), _examples(6)
    packed = collate(pack_examples(examples, 64), pad_id=0)
    with torch.no_grad():
        packed_loss = summed_token_loss(
            model(packed["input_ids"], position_ids=packed["position_ids"]).logits, packed["labels"]
        ) / count_targets(packed["labels"])
        total, targets = 0.0, 0
        for ex in examples:
            ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
            total += summed_token_loss(model(ids).logits, labels).item()
            targets += count_targets(labels)
    assert count_targets(packed["labels"]) == targets
    assert abs(packed_loss.item() - total / targets) < 1e-5


def _grads(micro_batch, accum, examples):
    model = _model()
    micro = [collate(examples[i * micro_batch : (i + 1) * micro_batch], pad_id=0) for i in range(accum)]
    global_targets = sum(count_targets(b["labels"]) for b in micro)
    for b in micro:
        normalised_loss(summed_token_loss(model(b["input_ids"]).logits, b["labels"]), global_targets).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_accumulation_split_does_not_change_gradients():
    examples = _examples(8, seed=1)
    a, b = _grads(2, 4, examples), _grads(8, 1, examples)
    assert (a - b).abs().max().item() < 1e-5
