"""The learning rate the optimizer actually uses: the warm-up from one rank's rate to N x it,
read back from the optimizer at steps 0, warmup/2 and warmup and after a resume, and the first
Adam update moving a weight by exactly what that step's rate implies."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dwave.config import ModelConfig
from dwave.schedule import ADAM_EPSILON, current_rate, rate_at
from dwave.train import Trainer

CONFIG = ModelConfig(residual_channels=8, dilation_channels=8, skip_channels=16, stacks=1,
                     max_dilation=4)
LR, RANKS, WARMUP = 1e-3, 4, 10


def batch(seed: int):
    codes = np.random.default_rng(seed).integers(0, 256, (2, CONFIG.receptive_field + 64))
    return tf.constant(codes, tf.uint8), tf.zeros(2, tf.int32)


def step(trainer: Trainer, seed: int) -> None:
    trainer.train_step(*batch(seed), tf.constant(False))


def test_the_schedule_climbs_from_one_ranks_rate_to_n_times_it():
    assert rate_at(0, LR, LR * RANKS, WARMUP) == LR
    assert rate_at(WARMUP // 2, LR, LR * RANKS, WARMUP) == pytest.approx(2.5 * LR)
    assert rate_at(WARMUP, LR, LR * RANKS, WARMUP) == pytest.approx(RANKS * LR)
    assert rate_at(10 * WARMUP, LR, LR * RANKS, WARMUP) == pytest.approx(RANKS * LR)
    assert rate_at(0, LR, LR, 0) == LR  # one rank: no warm-up


@pytest.mark.slow
def test_the_optimizer_uses_the_scheduled_rate_and_a_resume_continues_it(tmp_path):
    tf.keras.utils.set_random_seed(0)
    trainer = Trainer(CONFIG, LR, WARMUP, world_size=RANKS)
    assert current_rate(trainer.optimizer) == pytest.approx(LR)  # before the first update
    seen = {}
    for k in range(WARMUP + 2):
        step(trainer, k)
        # The rate of update k (0-based), as the optimizer holds it after making it.
        seen[k] = current_rate(trainer.optimizer)
        assert trainer.learning_rate == seen[k]
    for k in (0, WARMUP // 2, WARMUP, WARMUP + 1):
        assert seen[k] == pytest.approx(rate_at(k, LR, LR * RANKS, WARMUP), rel=1e-6), k
    assert seen[0] == pytest.approx(LR) and seen[WARMUP] == pytest.approx(RANKS * LR)
    assert seen[WARMUP // 2] == pytest.approx((1 + (RANKS - 1) / 2) * LR)

    # Resume half-way through the warm-up: the restored optimizer goes on from its own step.
    tf.keras.utils.set_random_seed(0)
    early = Trainer(CONFIG, LR, WARMUP, world_size=RANKS)
    for k in range(WARMUP // 2):
        step(early, k)
    path = tf.train.Checkpoint(model=early.model, optimizer=early.optimizer,
                               step=early.step).save(str(tmp_path / "ckpt"))
    resumed = Trainer(CONFIG, LR, WARMUP, world_size=RANKS)
    tf.train.Checkpoint(model=resumed.model, optimizer=resumed.optimizer,
                        step=resumed.step).restore(path).assert_existing_objects_matched()
    assert int(resumed.optimizer.iterations.numpy()) == WARMUP // 2
    step(resumed, WARMUP // 2)
    assert resumed.learning_rate == pytest.approx(rate_at(WARMUP // 2, LR, LR * RANKS, WARMUP))
    assert resumed.learning_rate == pytest.approx(seen[WARMUP // 2], rel=1e-6)


@pytest.mark.parametrize("ranks", [1, RANKS])
def test_the_first_adam_update_moves_a_weight_by_the_rate_it_reports(ranks):
    """Adam's first update is lr * g * s / (s |g| + eps) with s = sqrt(1 - beta_2): computed
    here from an independently taken gradient, compared with what the step did."""
    tf.keras.utils.set_random_seed(1)
    trainer = Trainer(CONFIG, LR, WARMUP, world_size=ranks)
    codes, genre = batch(3)
    variables = trainer.model.trainable_variables
    before = [v.numpy().copy() for v in variables]
    with tf.GradientTape() as tape:
        loss = trainer.loss(codes, genre)
    grads = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, variables)]
    trainer.train_step(codes, genre, tf.constant(False))
    rate = trainer.learning_rate
    assert rate == pytest.approx(LR)  # update 0 runs at one rank's rate, whatever the world
    s = np.sqrt(1 - 0.999)
    checked = 0
    for var, old, g in zip(variables, before, grads):
        expected = -rate * g * s / (s * np.abs(g) + ADAM_EPSILON)
        moved = var.numpy() - old
        np.testing.assert_allclose(moved, expected, rtol=2e-3, atol=1e-7, err_msg=var.name)  # float32 ulps
        checked += int((np.abs(g) > 1e-3).sum())
    assert checked > 100  # many weights with gradients well above epsilon: |step| ~ the rate
    # The rate each weight's step implies, read off the step itself. A rate that never reached
    # the optimizer (the Keras 2 Variable copy) would show here as that copy's value.
    implied = []
    for v, o, g in zip(variables, before, grads):
        big = np.abs(g) > 1e-3
        step_size = np.abs(v.numpy() - o)[big]
        implied.append(step_size * (s * np.abs(g[big]) + ADAM_EPSILON) / (s * np.abs(g[big])))
    implied = np.concatenate(implied)
    assert implied.size > 100
    assert np.median(implied) == pytest.approx(LR, rel=1e-3)
