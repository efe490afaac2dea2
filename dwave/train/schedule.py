"""The optimizer and its learning-rate schedule: Adam as the reference WaveNet trains it, with
a warm-up for large Horovod worlds.

The schedule is a Keras LearningRateSchedule evaluated by the optimizer itself on its own
update counter (`optimizer.iterations`, saved in every checkpoint), so a resumed run continues
the schedule at its step, and the rate the update used is the optimizer's to report:
`current_rate(optimizer)` reads the variable Keras assigns at the start of every
`apply_gradients`. (A `tf.Variable` passed as `learning_rate=` is not: Keras 2 copies its value
into a variable of its own when the optimizer is built, and assigning the original afterwards
changes nothing the update reads.)
"""

from __future__ import annotations

import math

import tensorflow as tf

# Adam as the reference TensorFlow WaveNet (ibab/tensorflow-wavenet) trains it: 1e-3 for one
# rank, epsilon 1e-4 (Keras's 1e-7 lets the first updates of rarely-used weights be huge).
ADAM_EPSILON = 1e-4


class RankWarmup(tf.keras.optimizers.schedules.LearningRateSchedule):
    """`base` (one rank's rate) at update 0, rising linearly to `peak` (base x ranks) at update
    `warmup_steps`: the gradual warm-up of Goyal et al. 2017 for the linearly scaled rate of a
    large synchronous batch. With one rank, base = peak: no warm-up, as the reference trains.
    Then constant, or with `decay_to` < 1 a half cosine from peak down to peak x decay_to at
    update `decay_steps` (the run's last), constant after it."""

    def __init__(self, base: float, peak: float, warmup_steps: int, decay_steps: int = 0,
                 decay_to: float = 1.0):
        # One rank (base = peak) has no warm-up: its decay starts at update 0.
        warmup_steps = int(warmup_steps) if base != peak else 0
        self.base, self.peak, self.warmup_steps = float(base), float(peak), warmup_steps
        self.decay_steps, self.decay_to = int(decay_steps), float(decay_to)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.warmup_steps == 0 or self.base == self.peak:
            rate = tf.constant(self.peak, tf.float32)
        else:
            rate = self.base + (self.peak - self.base) * tf.minimum(
                1.0, step / float(self.warmup_steps))
        if self.decay_to < 1.0 and self.decay_steps > self.warmup_steps:
            progress = tf.clip_by_value((step - self.warmup_steps)
                                        / float(self.decay_steps - self.warmup_steps), 0.0, 1.0)
            rate *= self.decay_to + (1.0 - self.decay_to) * 0.5 * (1.0 + tf.cos(math.pi * progress))
        return rate

    def get_config(self) -> dict:
        return {"base": self.base, "peak": self.peak, "warmup_steps": self.warmup_steps,
                "decay_steps": self.decay_steps, "decay_to": self.decay_to}


def make_optimizer(lr: float, world_size: int, warmup_steps: int, mixed: bool = False,
                   decay_steps: int = 0, decay_to: float = 1.0):
    """Adam on RankWarmup(lr, lr x world_size, ...); float16 loss scaling for `mixed`."""
    schedule = RankWarmup(lr, lr * world_size, warmup_steps, decay_steps, decay_to)
    optimizer = tf.keras.optimizers.Adam(learning_rate=schedule, epsilon=ADAM_EPSILON)
    if mixed:
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def current_rate(optimizer) -> float:
    """The learning rate of the optimizer's most recent update (before any: of its first),
    read from the variable the update reads."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(tf.keras.backend.get_value(inner.learning_rate))
