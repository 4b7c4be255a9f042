"""The general path: per-sample pre-activation Jacobians by automatic differentiation.

Works for every measurable layer. Reverse mode uses
`tf.GradientTape.batch_jacobian` (one backward sweep per output unit,
vectorised); forward mode pushes the `n0` input basis directions through the
network at once by repeating each sample `n0` times under a
`tf.autodiff.ForwardAccumulator`, which is cheaper when the input is small
compared with the measured outputs (convolutions).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from keras_localrank import linearize
from keras_localrank.graph import CaptureModel
from keras_localrank.spectra import in_xla_context
from keras_localrank.taps import Tap, preactivation
from keras_localrank.thin import thin_rows

__all__ = ["Preactivations", "choose_mode", "preactivation_jacobians", "preactivations"]


def choose_mode(taps: Sequence[Tap]) -> str:
    """`"forward"` when `n0` is smaller than the total measured output, else
    `"reverse"`: forward costs about `n0` forward passes for all taps at once,
    reverse about `n_l` backward passes per tap."""
    n0 = taps[0].input_dim
    if not all(getattr(t, "forward_mode_ok", True) for t in taps):
        return "reverse"  # forward mode does not pass through recurrent loops
    return "forward" if n0 < sum(t.units for t in taps) else "reverse"


def preactivations(inputs_model, taps, x, held=(), thin=None):
    """Flattened pre-activations `[B, n_l]` of every tap at inputs `x`.

    `held`: model inputs held at their values, passed after `x` to
    `inputs_model`, with `x`'s batch size. `thin`: `{tap name: thin_factor}`
    of taps that give their thin rows instead (`keras_localrank.thin`: fewer
    values, a Jacobian with the same Gram).
    """
    thin = thin or {}
    inputs = inputs_model([x, *held] if held else x, training=False)
    if not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    return [
        thin_rows(t.layer, inp, thin[t.name])
        if t.name in thin
        else tf.reshape(preactivation(t.layer, inp), [tf.shape(x)[0], -1])
        for t, inp in zip(taps, inputs)
    ]


def _repeat_held(held, z):
    """Held inputs repeated like the rows of `z`: `z` stacks `d` rows per
    sample (sample `b`, direction `i` at row `b * d + i`, as in `matfree.jvp`
    and `matfree.vjp`), so each held row is repeated `d` times."""
    if not held:
        return ()
    reps = tf.shape(z)[0] // tf.shape(held[0])[0]
    return [tf.repeat(h, reps, axis=0) for h in held]


class Preactivations:
    """`z -> [p_l(z)]`: the flattened pre-activations `[N, n_l]` of `taps`
    (`preactivations`), with the held inputs repeated to `z`'s rows; the
    taps in `thin` (`{name: thin_factor}`) give their thin rows instead
    (`keras_localrank.thin`).

    When the graph from the input to the taps is `linearize.linearizable`,
    the taps are Dense or convolution layers (`linearize.has_kernel_map`)
    and nothing is held, `linearized` is True and `tangents` gives the
    forward products by the layers' own linear maps, the primal computed
    once per sample (`matfree.jvp` uses it).

    Args:
        inputs_model: the model from the input to every tap's layer input
            (`taps.tap_inputs_model`).
        taps: the taps, in the order of `inputs_model`'s outputs.
        held: held model inputs of the samples (`[B, ...]` each).
        thin: `{tap name: thin_factor}`.
    """

    def __init__(self, inputs_model, taps, held=(), thin=None):
        self.inputs_model = inputs_model
        self.taps = tuple(taps)
        self.held = tuple(held)
        self.thin = thin or {}
        self._walk = None
        if not self.held and all(linearize.has_kernel_map(t.layer) for t in self.taps):
            if isinstance(inputs_model, CaptureModel):
                walk = inputs_model.captured_calls
            else:
                walk = (inputs_model, None)
            if walk is not None and linearize.linearizable(walk[0], xla=in_xla_context()):
                self._walk = walk
        self.linearized = self._walk is not None

    def __call__(self, z):
        return preactivations(
            self.inputs_model, self.taps, z, _repeat_held(self.held, z), thin=self.thin
        )

    def tangents(self, x, directions):
        """`[B, d, n_l]` products `J_l(x_b) v_{b,i}` of every tap, by
        `linearize.pushforward` (only when `linearized`).

        Args:
            x: `[B, *input_shape]` points.
            directions: `[B, d, n0]` directions.
        """
        model, calls = self._walk
        duals = linearize.pushforward(model, x, directions, calls)
        shape = tf.stack([tf.shape(x)[0], tf.shape(directions)[1], -1])
        out = []
        for tap, dual in zip(self.taps, duals):
            if tap.name in self.thin:
                rows = thin_rows(tap.layer, dual.tangent, self.thin[tap.name])
            else:
                rows = linearize.kernel_map(tap.layer, dual.tangent)
            out.append(tf.reshape(rows, shape))
        return out


def preactivation_jacobians(
    inputs_model,
    taps: Sequence[Tap],
    x: tf.Tensor,
    *,
    mode: str = "reverse",
    held: Sequence[tf.Tensor] = (),
) -> list[tf.Tensor]:
    """Per-sample Jacobians `d p_l(x) / d x`, flattened.

    Args:
        inputs_model: model from the input to every tap's layer input
            (`taps.tap_inputs_model`).
        taps: the taps, in the order of `inputs_model`'s outputs.
        x: `[B, *input_shape]` inputs in the compute dtype.
        mode: `"reverse"` (default) or `"forward"`.
        held: model inputs held at their values (not differentiated), passed
            after `x` to `inputs_model`, with `x`'s batch size.

    Returns:
        One `[B, n_l, n0]` tensor per tap.

    Raises:
        ValueError: for an unknown `mode`.
    """
    batch = tf.shape(x)[0]
    n0 = taps[0].input_dim
    if mode == "reverse":
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            preacts = preactivations(inputs_model, taps, x, held)
        jacobians = [tape.batch_jacobian(p, x) for p in preacts]
        del tape
        return [tf.reshape(j, [batch, t.units, n0]) for j, t in zip(jacobians, taps)]
    if mode == "forward":
        repeated = tf.repeat(x, n0, axis=0)  # sample b, direction i at b * n0 + i
        held = [tf.repeat(h, n0, axis=0) for h in held]
        basis = tf.tile(tf.eye(n0, dtype=x.dtype), [batch, 1])
        with tf.autodiff.ForwardAccumulator(
            repeated, tf.reshape(basis, tf.shape(repeated))
        ) as acc:
            preacts = preactivations(inputs_model, taps, repeated, held)
        out = []
        for p, t in zip(preacts, taps):
            jvp = tf.reshape(acc.jvp(p), [batch, n0, t.units])
            out.append(tf.linalg.matrix_transpose(jvp))
        return out
    raise ValueError(f"Expected `mode` in ('reverse', 'forward'). Received: mode={mode!r}")
