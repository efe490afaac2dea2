"""The learning rate the optimizer actually uses: the warm-up from one rank's rate to N x it,
read back from the optimizer at steps 0, warmup/2 and warmup and after a resume, and the first
Adam update moving a weight by exactly what that step's rate implies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from dwave.model.config import ModelConfig
from dwave.train.schedule import ADAM_EPSILON, current_rate
from dwave.train.trainer import Trainer

CONFIG = ModelConfig(residual_channels=8, dilation_channels=8, skip_channels=16, stacks=1,
                     max_dilation=4)
LR, RANKS, WARMUP = 1e-3, 4, 10


def rate_at(update: int, base: float, peak: float, warmup_steps: int, decay_steps: int = 0,
            decay_to: float = 1.0) -> float:
    """RankWarmup written again in plain Python, the independent computation these tests
    check it against: the rate update number `update` (0-based) uses."""
    warmup_steps = warmup_steps if base != peak else 0
    rate = peak if warmup_steps == 0 else base + (peak - base) * min(1.0, update / warmup_steps)
    if decay_to < 1.0 and decay_steps > warmup_steps:
        progress = min(1.0, max(0.0, (update - warmup_steps) / (decay_steps - warmup_steps)))
        rate *= decay_to + (1.0 - decay_to) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return rate


def batch(seed: int):
    codes = np.random.default_rng(seed).integers(0, 256, (2, CONFIG.receptive_field + 64))
    return tf.constant(codes, tf.uint8), tf.zeros(2, tf.int32)


def step(trainer: Trainer, seed: int) -> None:
    trainer.train_step(*batch(seed), tf.constant(False))


def first_update(trainer: Trainer):
    """(variables, their values before, their gradients taken here independently) around the
    trainer's first step on batch 3."""
    codes, genre = batch(3)
    variables = trainer.model.trainable_variables
    before = [v.numpy().copy() for v in variables]
    with tf.GradientTape() as tape:
        loss = trainer.loss(codes, genre)
    grads = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, variables)]
    trainer.train_step(codes, genre, tf.constant(False))
    return variables, before, grads


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
    variables, before, grads = first_update(trainer)
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


def test_the_decay_is_a_half_cosine_from_the_peak_after_the_warmup():
    assert rate_at(0, LR, LR, 0, 100, 0.1) == LR  # one rank: the decay starts at update 0
    assert rate_at(50, LR, LR, 0, 100, 0.1) == pytest.approx(0.55 * LR)  # half-way: the mean
    assert rate_at(100, LR, LR, 0, 100, 0.1) == pytest.approx(0.1 * LR)
    assert rate_at(500, LR, LR, 0, 100, 0.1) == pytest.approx(0.1 * LR)  # and stays there
    # N ranks: the warm-up first, the decay over the updates after it.
    assert rate_at(WARMUP, LR, 4 * LR, WARMUP, WARMUP + 10, 0.5) == pytest.approx(4 * LR)
    assert rate_at(WARMUP + 5, LR, 4 * LR, WARMUP, WARMUP + 10, 0.5) == pytest.approx(3 * LR)
    assert rate_at(7, LR, 4 * LR, WARMUP, 100, 1.0) == rate_at(7, LR, 4 * LR, WARMUP)


@pytest.mark.parametrize("ranks", [1, RANKS])
def test_the_optimizer_uses_the_decayed_rate(ranks):
    total = WARMUP + 6
    trainer = Trainer(CONFIG, LR, WARMUP, world_size=ranks, decay_steps=total, decay_to=0.2)
    for k in range(total + 2):
        step(trainer, k)
        assert trainer.learning_rate == pytest.approx(
            rate_at(k, LR, LR * ranks, WARMUP, total, 0.2), rel=1e-6), k
    assert trainer.learning_rate == pytest.approx(0.2 * LR * ranks)


def test_clipping_scales_the_gradients_to_the_global_norm_before_adam():
    """The first update with --clip-norm c is Adam's on g * c / |g| (|g| the global norm, from
    an independently taken gradient): through epsilon, a smaller step than unclipped."""
    tf.keras.utils.set_random_seed(1)
    clip = 1e-3
    trainer = Trainer(CONFIG, LR, 0, world_size=1, clip_norm=clip)
    variables, before, grads = first_update(trainer)
    norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    assert norm > 10 * clip  # clipping acts
    s = np.sqrt(1 - 0.999)
    for var, old, g in zip(variables, before, grads):
        clipped = g * clip / norm
        expected = -LR * clipped * s / (s * np.abs(clipped) + ADAM_EPSILON)
        ulp = float(np.spacing(np.abs(old).max()))  # the steps are a few float32 ulps here
        np.testing.assert_allclose(var.numpy() - old, expected, rtol=2e-3, atol=2 * ulp,
                                   err_msg=var.name)
        unclipped = LR * np.abs(g) * s / (s * np.abs(g) + ADAM_EPSILON)
        assert np.abs(expected).sum() < 0.5 * unclipped.sum()  # clipping changed the step


def test_the_moving_average_is_what_validation_sees_and_the_weights_come_back():
    """--ema m: after update t the average is d a + (1 - d) w, d = min(m, (1 + t) / (10 + t)),
    computed here from the weights after each step; inside averaged_weights() the model holds
    it, after the block its own weights, bit for bit."""
    tf.keras.utils.set_random_seed(2)
    trainer = Trainer(CONFIG, LR, 0, world_size=1, ema=0.5)
    variables = trainer.model.trainable_variables
    expected = [v.numpy().astype(np.float64) for v in variables]
    for t in range(4):
        step(trainer, t)
        d = min(0.5, (1 + t) / (10 + t))
        expected = [d * a + (1 - d) * v.numpy() for a, v in zip(expected, variables)]
    own = [v.numpy().copy() for v in variables]
    codes, genre = batch(9)
    own_loss = float(trainer.eval_step(codes, genre))
    with trainer.averaged_weights():
        for v, a in zip(variables, expected):
            np.testing.assert_allclose(v.numpy(), a, rtol=1e-5, atol=1e-7, err_msg=v.name)
        assert float(trainer.eval_step(codes, genre)) != own_loss
    for v, o in zip(variables, own):
        np.testing.assert_array_equal(v.numpy(), o)
    assert float(trainer.eval_step(codes, genre)) == own_loss
