"""`FastLoop`: a compiled training loop for small models, driven like `fit`.

Keras `fit` pays a fixed Python and dispatch cost per step and per epoch
(callbacks, logs, the `tf.data` iterator). With a 4x200 MLP and 16 batches
per epoch that cost is most of the run. `FastLoop` removes it:

- the data stay on the device as two tensors; each batch is gathered inside
  the compiled step from the epoch's order `mlp.epoch_order(n, seed, epoch)`,
  the order `mlp.epoch_batches` feeds `fit`, so both loops see the same
  batches in the same order;
- up to `steps_per_execution` optimizer steps run in one XLA-compiled
  `tf.while_loop` (`jit_compile=True`); the last, smaller batch of an epoch
  is a full-size gather with zero weights on the padding, so its loss is the
  same mean over its real examples;
- a call stops exactly at every step the callbacks must see (measurement
  steps, checkpoint epochs, the end): measurements never stall the loop and
  are taken at the same steps as with `fit`.

Keras callbacks are driven through a `keras.callbacks.CallbackList` with the
hooks `fit` would call at those steps: `on_train_begin`, `on_epoch_begin`,
`on_train_batch_end`, `on_epoch_end` (only at the epochs where a call stops),
`on_train_end`. So `ScheduledCallback`s (which read the optimizer's global
step) and epoch checkpoints work unchanged; per-epoch loggers such as
`CSVLogger` see only the epochs where a call stops.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_localrank.scheduled import global_step
from keras_localrank.studies.mlp import epoch_order
from keras_localrank.validation import check_int, check_positive_int

__all__ = ["FastLoop"]


class FastLoop:
    """Train a compiled Keras model on in-memory data with a compiled loop.

    Args:
        model: a compiled model (its `optimizer` is used and stepped).
        x: training inputs, shape `(n, ...)`.
        y: training labels, shape `(n,)`.
        loss_fn: per-example loss `f(labels, outputs)` (the model's loss).
        batch_size: examples per step (the last batch of an epoch is smaller).
        seed: seed of the data order (`mlp.epoch_order`).
        steps_per_execution: most optimizer steps per compiled call.
            Default 1024.
        jit_compile: compile the loop with XLA. Default True.

    Raises:
        TypeError, ValueError: bad sizes; a model that is not compiled.
    """

    def __init__(
        self,
        model: keras.Model,
        x,
        y,
        *,
        loss_fn,
        batch_size: int,
        seed: int,
        steps_per_execution: int = 1024,
        jit_compile: bool = True,
    ):
        global_step(model)  # ValueError when not compiled
        self.model = model
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.steps_per_execution = check_positive_int("steps_per_execution", steps_per_execution)
        self.seed = check_int("seed", seed, minimum=0)
        x, y = np.asarray(x), np.asarray(y)
        if len(x) != len(y) or not len(x):
            raise ValueError(
                f"Expected as many labels as inputs (> 0). Received: {len(x)} inputs, "
                f"{len(y)} labels"
            )
        self.n = len(x)
        self.steps_per_epoch = math.ceil(self.n / self.batch_size)
        self._x = tf.constant(x)
        self._y = tf.constant(y)
        self._padding = self.steps_per_epoch * self.batch_size - self.n
        # Epochs a call can touch: one call is at most `steps_per_execution` steps.
        self._epochs_per_call = self.steps_per_execution // self.steps_per_epoch + 2
        self._loss_fn = loss_fn
        self._orders = tf.function(self._orders_fn)
        self._run = tf.function(self._run_fn, jit_compile=jit_compile)

    # -- compiled pieces --------------------------------------------------------------

    def _orders_fn(self, first_epoch):
        rows = [
            epoch_order(self.n, self.seed, first_epoch + j) for j in range(self._epochs_per_call)
        ]
        orders = tf.cast(tf.stack(rows), tf.int32)
        return tf.pad(orders, [[0, 0], [0, self._padding]])

    def _run_fn(self, orders, first_epoch, start, count):
        model, optimizer = self.model, self.model.optimizer
        variables = model.trainable_variables
        spe, bs = self.steps_per_epoch, self.batch_size
        # Every index is computed with arithmetic and `tf.gather`, never with a
        # `tf.slice` at a loop-dependent offset: XLA on CPU ran the whole step
        # several times slower with such a slice in the loop body
        # (the previous body, side by side in `experiments/roofline_mlp.py`).
        flat = tf.reshape(orders, [-1])
        width = int(orders.shape[1])
        within = tf.range(bs, dtype=tf.int32)

        def body(i, loss):
            step = start + i
            row = tf.cast(step // spe - first_epoch, tf.int32)
            offset = tf.cast(step % spe, tf.int32) * bs + within
            idx = tf.gather(flat, row * width + offset)
            weights = tf.cast(offset < self.n, tf.float32)  # zero on the padding
            xb, yb = tf.gather(self._x, idx), tf.gather(self._y, idx)
            with tf.GradientTape() as tape:
                outputs = model(xb, training=True)
                per_example = tf.cast(self._loss_fn(yb, outputs), tf.float32)
                loss = tf.reduce_sum(per_example * weights) / tf.reduce_sum(weights)
            grads = tape.gradient(loss, variables)
            optimizer.apply(grads, variables)
            return i + 1, loss

        _, loss = tf.while_loop(
            lambda i, _: i < count,
            body,
            (tf.constant(0, tf.int64), tf.constant(0.0, tf.float32)),
        )
        return loss

    # -- driving ----------------------------------------------------------------------

    def run_steps(self, count: int) -> float:
        """Take `count` optimizer steps from the current global step; the loss of the last."""
        loss = float("nan")
        step = global_step(self.model)
        end = step + check_int("count", count, minimum=0)
        while step < end:
            n = min(end - step, self.steps_per_execution)
            first_epoch = step // self.steps_per_epoch
            loss = float(
                self._run(
                    self._orders(tf.constant(first_epoch, tf.int64)),
                    tf.constant(first_epoch, tf.int64),
                    tf.constant(step, tf.int64),
                    tf.constant(n, tf.int64),
                )
            )
            step += n
        return loss

    def fit(
        self,
        *,
        epochs: int,
        initial_epoch: int = 0,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        stop_steps: Iterable[int] = (),
        stop_every_epochs: int | None = None,
    ) -> None:
        """Train from `initial_epoch` to `epochs` and call the callbacks as `fit` would.

        Args:
            epochs: the last epoch (exclusive), as in `fit`.
            initial_epoch: the epoch to start from; the model's global step must
                be `initial_epoch * steps_per_epoch` (a fresh or restored model).
            callbacks: Keras callbacks.
            stop_steps: global steps at which the loop stops and calls
                `on_train_batch_end` (e.g. the measurement steps).
            stop_every_epochs: also stop at the end of every this many epochs
                and call `on_epoch_end` (e.g. the checkpoint period).

        Raises:
            ValueError: the global step does not match `initial_epoch`.
        """
        spe = self.steps_per_epoch
        check_int("epochs", epochs, minimum=1)
        check_int("initial_epoch", initial_epoch, minimum=0)
        if global_step(self.model) != initial_epoch * spe:
            raise ValueError(
                f"Expected the global step at initial_epoch={initial_epoch} to be "
                f"{initial_epoch * spe}. Received: {global_step(self.model)}"
            )
        start, end = initial_epoch * spe, epochs * spe
        stops = {s for s in stop_steps if start < s <= end}
        if stop_every_epochs:
            every = check_positive_int("stop_every_epochs", stop_every_epochs)
            stops.update(e * spe for e in range(initial_epoch + 1, epochs + 1) if e % every == 0)
        stops.add(end)
        cbs = keras.callbacks.CallbackList(
            list(callbacks), model=self.model, epochs=epochs, steps=spe, verbose=0
        )
        cbs.on_train_begin()
        step, epoch = start, initial_epoch
        cbs.on_epoch_begin(epoch)
        for stop in sorted(stops):
            loss = self.run_steps(stop - step)
            step = stop
            current = (step - 1) // spe
            while epoch < current:  # epochs passed inside the call
                epoch += 1
                cbs.on_epoch_begin(epoch)
            logs = {"loss": loss}
            cbs.on_train_batch_end((step - 1) % spe, logs)
            if step % spe == 0:
                cbs.on_epoch_end(epoch, logs)
                if step < end:
                    epoch += 1
                    cbs.on_epoch_begin(epoch)
        cbs.on_train_end()
