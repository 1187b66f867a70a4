"""PPO's experience passes: batches of rows of similar length without their padding columns, equal to full rows."""

import torch

from base_model import QwenForCausalLM
from conftest import tiny_config
from ppo.experience import Experience, build_sequences, length_batches, sequence_logprobs, sequence_values
from ppo.losses import masked_sum, policy_loss
from ppo.models import ValueModel
from ppo.rollout.engine import Rollout
from rm.model import RewardModel


def _batch(lengths_response: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in (3, 5, 2, 4, 6, 3, 5)]
    prompts = prompts[: len(lengths_response)]
    rollouts = [
        Rollout(torch.randint(3, 300, (n,), generator=g).tolist(), [-1.0] * n, "length") for n in lengths_response
    ]
    return build_sequences(prompts, rollouts, pad_id=0)


def test_length_batches_group_rows_longest_first_with_their_widths():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert length_batches(mask, 2) == [([1, 4], 4), ([3, 0], 3), ([2], 1)]
    assert length_batches(mask, 8) == [([1, 4, 3, 0, 2], 4)]


def test_trimmed_length_batches_equal_one_pass_over_full_rows():
    model = QwenForCausalLM(tiny_config(), seed=0).eval()
    ids, att, response_mask, _ = _batch([9, 1, 4, 12, 2, 7, 5])
    with torch.no_grad():
        full = model(ids, attention_mask=att, token_logprobs=True).token_logprobs  # (N, T), one pass
    for batch_size in (1, 2, 3, 7):
        got = sequence_logprobs(model, ids, att, batch_size)
        assert got.shape == full.shape
        real = att[:, 1:].bool()  # every predicted position of a real token
        torch.testing.assert_close(got[real], full[real], atol=1e-5, rtol=1e-5)
        assert (response_mask.bool() <= real).all()  # every response token is among those compared

    critic = ValueModel(RewardModel(QwenForCausalLM(tiny_config(), seed=1), "end_token", 1)).eval()
    with torch.no_grad():
        full_values = critic(ids, att).float()[:, :-1]
    got = sequence_values(critic, ids, att, 3)
    torch.testing.assert_close(got[real], full_values[real], atol=1e-5, rtol=1e-5)


def test_a_micro_batch_without_its_padding_columns_has_the_same_loss_and_gradients():
    ids, att, response_mask, _ = _batch([9, 1, 4, 12, 2])
    n, t = response_mask.shape
    g = torch.Generator().manual_seed(1)
    exp = Experience(ids, att, response_mask, *(torch.randn(n, t, generator=g) * response_mask for _ in range(6)))
    idx = [1, 2, 4]
    lengths = att.sum(-1).tolist()
    width = max(lengths[i] for i in idx)
    assert width < ids.shape[1]
    trimmed, whole = exp.rows(idx, width=width), exp.rows(idx)
    assert trimmed.input_ids.shape == (3, width) and trimmed.advantages.shape == (3, width - 1)
    assert whole.input_ids.shape == (3, ids.shape[1])

    def loss_and_grads(mb: Experience):
        model = QwenForCausalLM(tiny_config(), seed=0)
        out = model(mb.input_ids, attention_mask=mb.attention_mask, token_logprobs=True)
        per_token, _, _ = policy_loss(out.token_logprobs, mb.old_logprobs, mb.advantages, 0.2)
        loss = masked_sum(per_token, mb.response_mask)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    loss_t, grads_t = loss_and_grads(trimmed)
    loss_w, grads_w = loss_and_grads(whole)
    torch.testing.assert_close(loss_t, loss_w, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_t, grads_w):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
