"""DPO-family losses against plain reimplementations of their papers' formulas, element by element in Python."""

import math
import random

import pytest
import torch

from align.core.losses import summed_logps
from base_model.losses import token_logprobs
from sft.preference_losses import dpo_loss, ipo_loss, kto_loss, kto_reference_point, simpo_loss


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 16, generator=g, dtype=torch.float64) * 80  # (4, B): chosen, rejected, ref c, ref r
    tokens = torch.randint(1, 60, (2, 16), generator=g).double()
    return logps, tokens


def test_dpo_and_cdpo_follow_eq_7_and_label_flipping(batch):
    (c, r, rc, rr), _ = batch
    for beta, eps in ((0.1, 0.0), (0.5, 0.0), (0.1, 0.2)):
        losses, chosen_rewards, rejected_rewards = dpo_loss(c, r, rc, rr, beta, eps)
        for i in range(16):
            h = beta * ((c[i] - rc[i]) - (r[i] - rr[i])).item()
            expected = -(1 - eps) * logsigmoid(h) - eps * logsigmoid(-h)
            assert losses[i].item() == pytest.approx(expected, abs=1e-6)
            assert chosen_rewards[i].item() == pytest.approx(beta * (c[i] - rc[i]).item(), abs=1e-9)
            assert rejected_rewards[i].item() == pytest.approx(beta * (r[i] - rr[i]).item(), abs=1e-9)


def test_ipo_is_the_squared_distance_to_half_over_tau(batch):
    (c, r, rc, rr), (tc, tr) = batch
    tau = 0.3
    losses, _, _ = ipo_loss(c, r, rc, rr, tc, tr, tau)
    for i in range(16):
        h = (c[i] - rc[i]).item() / tc[i].item() - (r[i] - rr[i]).item() / tr[i].item()
        assert losses[i].item() == pytest.approx((h - 1 / (2 * tau)) ** 2, abs=1e-6)


def test_simpo_uses_length_normalised_rewards_and_a_margin(batch):
    (c, r, _, _), (tc, tr) = batch
    losses, chosen_rewards, _ = simpo_loss(c, r, tc, tr, beta=2.0, gamma=0.5)
    for i in range(16):
        margin = 2.0 * c[i].item() / tc[i].item() - 2.0 * r[i].item() / tr[i].item() - 0.5
        assert losses[i].item() == pytest.approx(-logsigmoid(margin), abs=1e-6)
        assert chosen_rewards[i].item() == pytest.approx(2.0 * c[i].item() / tc[i].item(), abs=1e-9)


def test_kto_value_function_and_reference_point(batch):
    (c, r, rc, rr), _ = batch
    desirable = torch.tensor([random.Random(i).random() < 0.5 for i in range(16)])
    z0 = kto_reference_point(r, rr)
    assert z0.item() == pytest.approx(max(0.0, sum((r - rr).tolist()) / 16), abs=1e-9) and not z0.requires_grad
    losses, rewards = kto_loss(c, rc, desirable, z0, beta=0.2, desirable_weight=1.5, undesirable_weight=0.7)
    for i in range(16):
        ratio = (c[i] - rc[i]).item()
        if desirable[i]:
            expected = 1.5 * (1 - sigmoid(0.2 * (ratio - z0.item())))
        else:
            expected = 0.7 * (1 - sigmoid(0.2 * (z0.item() - ratio)))
        assert losses[i].item() == pytest.approx(expected, abs=1e-6)
        assert rewards[i].item() == pytest.approx(0.2 * ratio, abs=1e-9)
    assert kto_reference_point(torch.zeros(3), torch.ones(3)).item() == 0.0  # clamped at 0


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    c, r = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    losses, _, _ = dpo_loss(c, r, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    losses.sum().backward()
    assert c.grad.item() == pytest.approx(-0.05) and r.grad.item() == pytest.approx(0.05)  # ∓β σ(0)


def test_sequence_logps_sum_the_target_tokens_of_each_row():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 6]])
    input_ids = labels.clamp(min=0)  # the inputs are the labels wherever there is a target
    # a model's token_logprobs: here the logits through an identity head
    token_logps, _ = token_logprobs(logits[:, :-1], torch.eye(7), input_ids[:, 1:])
    logps, tokens = summed_logps(token_logps, labels)
    logp = torch.log_softmax(logits, -1)
    expected = [logp[0, 0, 3] + logp[0, 1, 4], logp[1, 1, 1] + logp[1, 2, 2] + logp[1, 3, 6]]
    assert torch.allclose(logps, torch.stack(expected), atol=1e-6) and tokens.tolist() == [2, 3]
