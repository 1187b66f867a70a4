"""PPO maths against hand-worked numbers and plain-loop reference implementations on random inputs."""

import math
import random

import pytest
import torch

from base_model.losses import token_logprobs
from ppo.kl_control import AdaptiveKLController, FixedKLController
from ppo.losses import (
    explained_variance,
    gae,
    kl_estimate,
    kl_penalised_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)


def test_gae_by_hand():
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.9)
    assert adv.tolist()[0] == pytest.approx([0.433, 0.37, 0.3])
    assert ret.tolist()[0] == pytest.approx([0.933, 0.97, 1.0])


def test_gae_ignores_padding():
    adv, ret = gae(
        torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.6, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]), 1.0, 1.0
    )
    assert adv.tolist()[0] == pytest.approx([0.5, 0.4, 0.0])
    assert ret.tolist()[0] == pytest.approx([1.0, 1.0, 0.0])


def test_masked_statistics_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert masked_mean(x, m).item() == pytest.approx(2.5)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 3.5])
    assert masked_var(x, m).item() == pytest.approx(5 / 3)  # squares 2.25+0.25+0.25+2.25 over n-1 = 3
    w = masked_whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6) and w[0, 2] == 0
    assert masked_var(w, m).item() == pytest.approx(1.0, abs=1e-5)


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)


def test_kl_penalised_rewards_by_hand():
    rewards, kl = kl_penalised_rewards(
        torch.tensor([2.0]),
        torch.tensor([[-1.0, -2.0, -3.0]]),
        torch.tensor([[-1.5, -2.0, -9.0]]),
        torch.tensor([[1.0, 1.0, 0.0]]),
        0.1,
    )
    assert kl.tolist()[0] == pytest.approx([0.5, 0.0, 0.0])
    assert rewards.tolist()[0] == pytest.approx([-0.05, 2.0, 0.0])


def test_policy_and_value_losses_by_hand():
    lp, old, adv = torch.tensor([[math.log(1.5), math.log(0.5)]]), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]])
    loss, clipped, approx_kl = policy_loss(lp, old, adv, clip_range=0.2)
    # ratio 1.5 with A=1: max(-1.5, -1.2) = -1.2 (clipped); ratio 0.5 with A=-1: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.tolist()[0] == pytest.approx([-1.2, 0.8])
    assert clipped.tolist()[0] == [1.0, 1.0]
    assert approx_kl.tolist()[0] == pytest.approx([0.5 * math.log(1.5) ** 2, 0.5 * math.log(0.5) ** 2])
    v_loss, v_clip = value_loss(
        torch.tensor([[1.0, 0.1]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0, 0.0]]), 0.15
    )
    # first: clipped value 0.65 -> max(1.0, 1.8225) / 2; second: 0.1 within range -> 0.01 / 2
    assert v_loss.tolist()[0] == pytest.approx([0.91125, 0.005])
    assert v_clip.tolist()[0] == [1.0, 0.0]


def test_entropy_and_explained_variance():
    uniform = torch.zeros(1, 1, 4)  # logits: hidden states through an identity head
    _, entropy = token_logprobs(uniform, torch.eye(4), torch.zeros(1, 1, dtype=torch.long), entropy=True)
    assert entropy.item() == pytest.approx(math.log(4))
    m = torch.ones(1, 4)
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert explained_variance(returns, returns, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, m).item() == pytest.approx(0.0)


# ------------------------------------------------------------------------------ plain-loop references


def ref_gae(rewards, values, mask, gamma, lam):
    adv = [[0.0] * len(r) for r in rewards]
    for b in range(len(rewards)):
        n = int(sum(mask[b]))
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    ret = [[(adv[b][t] + values[b][t]) * mask[b][t] for t in range(len(rewards[b]))] for b in range(len(rewards))]
    return adv, ret


def random_batch(seed, b=5, t=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    return g, mask


@pytest.mark.parametrize("seed", range(5))
def test_against_plain_loops_on_random_inputs(seed):
    g, mask = random_batch(seed)
    rewards, values = torch.randn(mask.shape, generator=g), torch.randn(mask.shape, generator=g)
    gamma, lam = random.Random(seed).uniform(0.9, 1.0), random.Random(seed + 1).uniform(0.8, 1.0)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    assert torch.allclose(adv, torch.tensor(ref_adv), atol=1e-5) and torch.allclose(
        ret, torch.tensor(ref_ret), atol=1e-5
    )

    xs = [x for row, mrow in zip(rewards.tolist(), mask.tolist()) for x, m in zip(row, mrow) if m]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    assert masked_mean(rewards, mask).item() == pytest.approx(mean, abs=1e-5)
    assert masked_var(rewards, mask).item() == pytest.approx(var, abs=1e-5)
    white = masked_whiten(rewards, mask)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            want = (rewards[b, t].item() - mean) / math.sqrt(var + 1e-8) if mask[b, t] else 0.0
            assert white[b, t].item() == pytest.approx(want, abs=1e-4)

    lp, old = -torch.rand(mask.shape, generator=g) * 3, -torch.rand(mask.shape, generator=g) * 3
    loss, clipped, _ = policy_loss(lp, old, rewards, 0.2)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            r, a = math.exp(lp[b, t].item() - old[b, t].item()), rewards[b, t].item()
            want = max(-a * r, -a * min(max(r, 0.8), 1.2))
            assert loss[b, t].item() == pytest.approx(want, rel=1e-4, abs=1e-5)
    v_new, v_old = torch.randn(mask.shape, generator=g), torch.randn(mask.shape, generator=g)
    v_loss, _ = value_loss(v_new, v_old, ret, 0.15)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            vc = v_old[b, t].item() + min(max(v_new[b, t].item() - v_old[b, t].item(), -0.15), 0.15)
            want = 0.5 * max((v_new[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2)
            assert v_loss[b, t].item() == pytest.approx(want, rel=1e-4, abs=1e-5)
    scores = torch.randn(mask.shape[0], generator=g)
    tok_rewards, kl = kl_penalised_rewards(scores, lp, old, mask, 0.04, "k3")
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        for t in range(mask.shape[1]):
            d = lp[b, t].item() - old[b, t].item()
            k3 = (math.exp(-d) - 1 + d) if t < n else 0.0
            want = -0.04 * k3 + (scores[b].item() if t == n - 1 else 0.0)
            assert tok_rewards[b, t].item() == pytest.approx(want, abs=1e-5)
    logits = torch.randn(2, 3, 7, generator=g)
    p = torch.softmax(logits, -1)
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    lp, entropy = token_logprobs(logits, torch.eye(7), tokens, entropy=True)  # logits through an identity head
    assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-5)
    for b in range(2):
        for t in range(3):
            row = logits[b, t].tolist()
            lse = math.log(sum(math.exp(v) for v in row))
            assert lp[b, t].item() == pytest.approx(row[tokens[b, t]] - lse, abs=1e-5)
    assert masked_sum(rewards, mask).item() == pytest.approx(sum(xs), abs=1e-4)
    ev = explained_variance(values, ret, mask).item()
    res = [
        r - v for rr, vv, mm in zip(ret.tolist(), values.tolist(), mask.tolist()) for r, v, m in zip(rr, vv, mm) if m
    ]
    rs = [r for rr, mm in zip(ret.tolist(), mask.tolist()) for r, m in zip(rr, mm) if m]
    var = lambda z: sum((x - sum(z) / len(z)) ** 2 for x in z) / (len(z) - 1)
    assert ev == pytest.approx(1 - var(res) / var(rs), abs=1e-4)


def test_kl_controllers():
    fixed = FixedKLController(0.04)
    fixed.update(10.0, 1)
    assert fixed.value == 0.04
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    adaptive.update(12.0, 100)  # error clipped to 0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    adaptive.update(3.0, 100)  # error -0.5 clipped to -0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.002) * (1 - 0.002))
    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value and restored.target == 6.0


def test_masked_moments_over_ranks_equal_the_moments_of_all_values():
    """Each 'rank' contributes count, sum and sum of squares; summing them gives the moments of the union."""
    from ppo.losses import masked_moments

    torch.manual_seed(0)
    parts = [(torch.randn(3, 5), (torch.rand(3, 5) > 0.3).float()) for _ in range(3)]
    everything = torch.cat([x[m.bool()] for x, m in parts]).double()
    totals = sum(torch.stack([m.double().sum(), (x.double() * m).sum(), (x.double() ** 2 * m).sum()]) for x, m in parts)
    for x, m in parts:
        n, mean, var = masked_moments(x, m, all_reduce=lambda t: totals)
        assert n.item() == len(everything)
        assert mean.item() == pytest.approx(everything.mean().item(), abs=1e-12)
        assert var.item() == pytest.approx(everything.var(unbiased=True).item(), abs=1e-12)


def test_running_moments_equal_the_moments_of_every_batch_seen():
    import numpy as np

    from ppo.experience import RunningMoments

    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, size=n) for n in (5, 1, 17, 8)]
    moments = RunningMoments()
    for b in batches:
        moments.update(len(b), float(b.mean()), float(((b - b.mean()) ** 2).sum()))
    seen = np.concatenate(batches)
    assert moments.count == len(seen)
    assert moments.mean == pytest.approx(seen.mean(), abs=1e-12)
    assert moments.std == pytest.approx(seen.std(ddof=1), abs=1e-12)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.std == moments.std and RunningMoments().std == 1.0


def test_critic_free_group_advantages_against_their_formulas():
    from ppo.losses import group_advantages

    g = torch.Generator().manual_seed(3)
    scores = torch.randn(12, generator=g, dtype=torch.float64)
    k = 4
    grpo, rloo = group_advantages(scores, k, "grpo"), group_advantages(scores, k, "rloo")
    for i in range(12):
        group = scores[i // k * k : i // k * k + k].tolist()
        mean = sum(group) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))  # unbiased, as TRL's GRPO
        assert grpo[i].item() == pytest.approx((scores[i].item() - mean) / (std + 1e-4), abs=1e-9)
        others = [x for j, x in enumerate(group) if j != i % k]
        assert rloo[i].item() == pytest.approx(scores[i].item() - sum(others) / (k - 1), abs=1e-9)
    assert abs(rloo.view(3, 4).sum(1)).max() < 1e-9  # leave-one-out advantages of a group sum to zero
    with pytest.raises(ValueError, match="unknown"):
        group_advantages(scores, k, "ppo")


def test_reinforce_pp_returns_are_gae_with_no_critic_and_lambda_one():
    """REINFORCE++ (Hu 2025): the return from each token (KL penalties and the final score, γ = 1), no baseline."""
    rewards = torch.tensor([[0.1, -0.2, 1.5, 0.0], [-0.1, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    expected = torch.tensor([[1.4, 1.3, 1.5, 0.0], [1.9, 2.0, 0.0, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)


def loop_gae(rewards, values, mask, gamma, lam):
    """GAE position by position, from the last one back (the recursion as written)."""
    advantages = torch.zeros_like(values)
    last = torch.zeros(values.shape[0], dtype=values.dtype)
    for t in reversed(range(values.shape[1])):
        next_mask = mask[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < values.shape[1] else torch.zeros_like(last)
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last * next_mask
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


@pytest.mark.parametrize("t", [1, 2, 7, 300])
def test_gae_scan_equals_the_recursion_on_responses_after_prompts(t):
    """Response masks as PPO builds them: zeros over the prompt, ones over the response, zeros after; also a mask
    with a gap, where the recursion restarts."""
    g = torch.Generator().manual_seed(t)
    b = 6
    start = torch.randint(0, t, (b,), generator=g)
    end = start + torch.randint(1, t + 1, (b,), generator=g)
    pos = torch.arange(t)[None]
    mask = ((pos >= start[:, None]) & (pos < end[:, None])).float()
    if t > 4:
        mask[0, t // 2] = 0.0  # a gap inside a response
    rewards, values = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    ref_adv, ref_ret = loop_gae(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(adv, ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ref_ret, atol=1e-5, rtol=1e-5)
