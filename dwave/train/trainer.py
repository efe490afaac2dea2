"""One rank's model, optimizer and compiled steps: what a training step does, nothing of where
its data comes from or where its results go (dwave.train.loop)."""

from __future__ import annotations

import contextlib
import hashlib
import math

from ..model.config import ModelConfig
from ..ranks import Ranks


def weights_digest(variables) -> str:
    """sha256 of every weight's bytes: equal digests mean bit-identical models."""
    h = hashlib.sha256()
    for v in variables:
        h.update(v.numpy().tobytes())
    return h.hexdigest()


class Trainer:
    """The model, optimizer and compiled steps of one rank. `ranks`: the job's (dwave.ranks);
    default a job of one process."""

    def __init__(self, model_config: ModelConfig, lr: float, warmup_steps: int, world_size: int,
                 precision: str = "fp32", ranks: Ranks | None = None, seed: int | None = None,
                 decay_steps: int = 0, decay_to: float = 1.0, clip_norm: float = 0.0,
                 ema: float = 0.0):
        import tensorflow as tf

        from ..model import fused_ops, output
        from ..model.network import WaveNet
        from .schedule import make_optimizer

        if seed is not None:
            # The same initial weights for the same seed, in any process. tf.random.set_seed
            # alone is not enough: Keras draws the seed of each unseeded initializer from
            # Python's `random`, which this seeds too (with numpy's global state).
            tf.keras.utils.set_random_seed(seed)
        self.config = model_config
        self.ranks = ranks or Ranks()
        self.distribution = output.for_model(model_config)
        self.model = WaveNet(model_config, precision, fused_ops.for_training(precision))
        self.mixed = precision == "mixed"
        self.optimizer = make_optimizer(lr, world_size, warmup_steps, self.mixed, decay_steps,
                                        decay_to)
        self.optimizer.build(self.model.trainable_variables)
        self.clip_norm, self.ema = clip_norm, ema
        # The moving average of every weight (Polyak averaging), kept beside them.
        self.averages = [tf.Variable(v, trainable=False, name=v.name.split(":")[0] + "/average")
                         for v in self.model.trainable_variables] if ema > 0 else []
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.train_step = tf.function(self._train_step, reduce_retracing=True)
        self.eval_step = tf.function(self.loss, reduce_retracing=True)

    def loss(self, codes, condition):
        """Mean cross-entropy in nats of predicting codes[:, rf:] from codes[:, :-1]."""
        import tensorflow as tf

        rf = self.config.receptive_field
        logits = self.model(codes[:, :-1],
                            condition=condition if self.config.conditioned else None,
                            training=True)
        return self.distribution.loss(logits, tf.cast(codes[:, rf:], tf.int32))

    def _train_step(self, codes, condition, stop_requested):
        """One synchronous update. Returns (loss averaged over ranks, any rank asked to stop).
        One collective per step: the gradients, the loss and the stop flag travel in one group
        (Ranks.average)."""
        import tensorflow as tf

        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = self.loss(codes, condition)
            scaled = self.optimizer.get_scaled_loss(loss) if self.mixed else loss
        grads = tape.gradient(scaled, variables)
        if self.mixed:
            grads = self.optimizer.get_unscaled_gradients(grads)
        stop = tf.cast(stop_requested, tf.float32)
        if self.ranks.distributed:
            # Averaged, the flag is > 0 exactly when some rank's is 1.
            *grads, shared = self.ranks.average(list(grads) + [tf.stack([loss, stop])])
            loss, stop = shared[0], shared[1]
        if self.clip_norm > 0:  # after the allreduce: every rank clips the same gradients
            grads, _ = tf.clip_by_global_norm(grads, self.clip_norm)
        self.optimizer.apply_gradients(zip(grads, variables))
        if self.averages:
            # TensorFlow's ExponentialMovingAverage with num_updates: a smaller decay early,
            # so the average is not held at the initial weights for the first ~1/(1-ema) steps.
            t = tf.cast(self.step, tf.float32)
            decay = tf.minimum(self.ema, (1.0 + t) / (10.0 + t))
            for average, v in zip(self.averages, variables):
                average.assign(decay * average + (1.0 - decay) * v)
        self.step.assign_add(1)
        return loss, stop > 0

    def start_average(self) -> None:
        """The moving average starts again from the current weights."""
        for average, v in zip(self.averages, self.model.trainable_variables):
            average.assign(v)

    @contextlib.contextmanager
    def averaged_weights(self):
        """The model holds the weights' moving average inside the block (with --ema; else its
        own weights), its own weights again after it."""
        own = [v.numpy() for v in self.model.trainable_variables] if self.averages else []
        for average, v in zip(self.averages, self.model.trainable_variables):
            v.assign(average)
        try:
            yield
        finally:
            for value, v in zip(own, self.model.trainable_variables):
                v.assign(value)

    @property
    def learning_rate(self) -> float:
        """The rate of the last update, read back from the optimizer."""
        from .schedule import current_rate

        return current_rate(self.optimizer)

    def broadcast_from_rank0(self) -> None:
        """Make every rank start from rank 0's weights and optimizer state."""
        self.ranks.broadcast_variables(self.model.variables + self.averages)
        self.ranks.broadcast_variables(self.optimizer.variables)
        self.ranks.broadcast_variables([self.step])

    def validation_bits(self, sampler, batches: int) -> float:
        """Mean loss in bits over a fixed set of validation batches, shared out over the ranks
        (the same windows every time, so the curve compares like with like)."""
        import tensorflow as tf

        mine = range(self.ranks.rank, batches, self.ranks.size)
        total = sum(float(self.eval_step(*sampler.batch(0, i))) for i in mine)
        total, count = self.ranks.sum(tf.constant([total, float(len(mine))], tf.float64)).numpy()
        return total / max(count, 1) / math.log(2.0)

    def weight_digests(self) -> list[str]:
        """Every rank's weight digest, in rank order: one value when the ranks agree."""
        return self.ranks.gather(weights_digest(self.model.variables))
