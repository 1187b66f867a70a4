"""Our losses against the peers' own implementations on random inputs, to 1e-6: OpenRLHF's `DPOLoss`,
`PolicyLoss`, `ValueLoss` and `compute_approx_kl`, and TRL's `CPOTrainer.cpo_loss` (its SimPO).

Where a peer writes a loss inline inside its trainer (TRL's DPO, KTO and GRPO, OpenRLHF's group advantages, which
live in a Ray actor module), there is no function to call; those are tested against the papers' formulas in
`test_dpo_losses.py` and `test_ppo_losses.py`.

OpenRLHF is installed without its dependencies (`pip install --no-deps openrlhf`, as the README's test command
does): its package `__init__` pulls in Ray, flash-attn and vLLM, so the two modules used here are imported on
their own.
"""

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from ppo.losses import kl_estimate, masked_mean, policy_loss, value_loss
from sft.preference_losses import dpo_loss, ipo_loss, simpo_loss


def openrlhf_module(name: str):
    """`openrlhf.models.<name>` without running the package's `__init__` (which imports Ray and vLLM)."""
    spec = sys.modules["openrlhf"].__spec__ if "openrlhf" in sys.modules else importlib.util.find_spec("openrlhf")
    if spec is None:
        pytest.fail("OpenRLHF is not installed: pip install --no-deps openrlhf==0.11.2 (see the README)")
    root = Path(spec.submodule_search_locations[0])
    for pkg, path in (("openrlhf", root), ("openrlhf.models", root / "models")):
        if pkg not in sys.modules or not hasattr(sys.modules[pkg], "__path__"):
            module = types.ModuleType(pkg)
            module.__path__ = [str(path)]
            module.__spec__ = importlib.util.spec_from_loader(pkg, None, is_package=True)
            module.__spec__.submodule_search_locations = [str(path)]
            sys.modules[pkg] = module
    return importlib.import_module(f"openrlhf.models.{name}")


@pytest.fixture(scope="module")
def orl_loss():
    return openrlhf_module("loss")


def random_logps(seed: int, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=g, dtype=torch.float64) * 60 for _ in range(4)]


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.25)])
def test_dpo_and_cdpo_equal_openrlhf(orl_loss, beta, eps):
    c, r, rc, rr = random_logps(1)
    ours, our_c, our_r = dpo_loss(c, r, rc, rr, beta, eps)
    peer, peer_c, peer_r = orl_loss.DPOLoss(beta, label_smoothing=eps)(c, r, rc, rr)
    assert abs(ours.mean().item() - peer.item()) < 1e-6
    assert torch.allclose(our_c, peer_c, atol=1e-6) and torch.allclose(our_r, peer_r, atol=1e-6)


def test_ipo_equals_openrlhf_per_token(orl_loss):
    """Ours divides each log-ratio by its response length (TRL's IPO); OpenRLHF's does not, so the two agree
    exactly when the log-probabilities are the per-token means."""
    c, r, rc, rr = random_logps(2)
    tc, tr = torch.full_like(c, 7), torch.full_like(r, 11)
    ours, _, _ = ipo_loss(c, r, rc, rr, tc, tr, 0.3)
    peer, _, _ = orl_loss.DPOLoss(0.3, ipo=True)(c / tc, r / tr, rc / tc, rr / tr)
    assert abs(ours.mean().item() - peer.item()) < 1e-6


def test_simpo_equals_trl_cpo_loss():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    c, r, _, _ = random_logps(3)
    g = torch.Generator().manual_seed(4)
    tc, tr = torch.randint(1, 50, (32,), generator=g).double(), torch.randint(1, 50, (32,), generator=g).double()
    for beta, gamma in ((2.0, 0.5), (2.5, 1.4)):
        trainer = types.SimpleNamespace(  # the attributes cpo_loss reads
            alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
            accelerator=types.SimpleNamespace(device="cpu"),
        )  # fmt: skip
        peer, peer_c, peer_r = CPOTrainer.cpo_loss(trainer, c / tc, r / tr)  # SimPO averages log-probs
        ours, our_c, our_r = simpo_loss(c, r, tc, tr, beta, gamma)
        assert torch.allclose(ours, peer, atol=1e-6)
        assert torch.allclose(our_c, peer_c, atol=1e-6) and torch.allclose(our_r, peer_r, atol=1e-6)


def ppo_batch(seed: int, b: int = 6, t: int = 12):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = (torch.arange(t)[None] < torch.randint(3, t + 1, (b, 1), generator=g)).double()
    return logp, old, adv, mask


@pytest.mark.parametrize("clip", [0.1, 0.2])
def test_policy_loss_equals_openrlhf(orl_loss, clip):
    logp, old, adv, mask = ppo_batch(5)
    per_token, clipped, _ = policy_loss(logp, old, adv, clip)
    peer, clip_ratio, *_ = orl_loss.PolicyLoss(clip, clip)(logp, old, adv, action_mask=mask)
    assert abs(masked_mean(per_token, mask).item() - peer.item()) < 1e-6
    assert abs(masked_mean(clipped, mask).item() - clip_ratio.item()) < 1e-6


def test_value_loss_equals_openrlhf(orl_loss):
    values, old, returns, mask = ppo_batch(6)
    per_token, _ = value_loss(values, old, returns, 0.15)
    peer = orl_loss.ValueLoss(clip_eps=0.15)(values, old, returns, action_mask=mask)
    assert abs(masked_mean(per_token, mask).item() - peer.item()) < 1e-6


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_equal_openrlhf(estimator):
    utils = openrlhf_module("utils")
    logp, ref, _, _ = ppo_batch(7)  # log-ratios well inside OpenRLHF's clamp at ±10
    peer = utils.compute_approx_kl(logp, ref, kl_estimator=estimator)
    assert torch.allclose(kl_estimate(logp.float(), ref.float(), estimator), peer, atol=1e-6)
