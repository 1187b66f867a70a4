"""The training state every checkpoint holds: written, read back, and checked before a resume."""

import pytest

from align.core.checkpointing import TrainingState
from align.core.config import ConfigError


def _state(**changes):
    base = dict(step=0, total_steps=100, world_size=2, micro_batch_size=4, grad_accum=2, seed=0)
    return TrainingState(**{**base, **changes})


def test_training_state_round_trips_through_its_dict():
    state = _state(step=40, samples_seen=640, extra={"kl_ctl": {"value": 0.1}})
    assert TrainingState.from_dict(state.to_dict(), "x") == state


@pytest.mark.parametrize(
    "field,value", [("world_size", 1), ("total_steps", 50), ("micro_batch_size", 8), ("grad_accum", 1), ("seed", 3)]
)
def test_resume_with_a_different_setting_names_it(field, value):
    saved = _state(step=40)
    with pytest.raises(ConfigError, match=f"{field} {getattr(saved, field)} in the checkpoint, {value} now"):
        saved.check_resumable_as(_state(**{field: value}), "ckpt")
    saved.check_resumable_as(_state(), "ckpt")  # the same settings resume


def test_a_state_from_an_older_checkpoint_is_refused_with_what_it_lacks():
    with pytest.raises(ConfigError, match="lacks grad_accum, micro_batch_size, seed"):
        TrainingState.from_dict({"step": 3, "total_steps": 10, "world_size": 1}, "old/client_state.json")


def test_state_at_a_step_counts_the_rows_consumed():
    assert _state().at_step(10).samples_seen == 10 * 4 * 2 * 2
    ppo = _state().at_step(3, samples_per_step=16, extra={"kl_ctl": {}})
    assert (ppo.step, ppo.samples_seen, ppo.extra) == (3, 48, {"kl_ctl": {}})
