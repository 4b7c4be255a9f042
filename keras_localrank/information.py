"""Mutual information of a layer's representation: noise, binning, local Gaussian channel.

A deterministic layer `T = h(X)` has infinite (continuous `X`) or trivial
(discrete `X`) mutual information with its input, so every estimator here
states the noise or the discretisation it assumes, and carries that parameter
in its result (`InformationEstimate`):

- **Noise injection** (`pairwise_information`): `T_s = h(X) + N(0, s^2 I)`
  with `X` uniform over the `N` samples given. The pairwise-distance bounds of
  Kolchinsky & Tracey bracket the entropy of the Gaussian mixture: with
  `D_ij = ||h_i - h_j||^2`,

      I(X; T_s) <= -1/N sum_i log(1/N sum_j exp(-D_ij / (2 s^2)))   (KL)
      I(X; T_s) >= -1/N sum_i log(1/N sum_j exp(-D_ij / (8 s^2)))   (Bhattacharyya)

  and `I(T_s; Y) = H(T_s) - H(T_s | Y)` from the same bounds on the
  label-conditional mixtures (see `pairwise_information` for which
  combination is a bound and which an estimate).
- **Binning** (`binned_information`): each unit's value falls into a bin;
  `I(X; T) = H(T_binned)` for a deterministic layer and distinct inputs.
- **Local Gaussian channel** (`gaussian_channel_information`): from the
  singular values `s_i(x)` of the layer's input Jacobian,
  `1/2 sum_i log(1 + s_i(x)^2 / sigma^2)` per sample: exactly `I(X; T_s)`
  for a linear layer and white Gaussian input, a soft local rank otherwise.

All values are in **nats** (`InformationEstimate.bits` converts). The
pairwise and binning estimators run in NumPy float64 on the host (probe sets
are small; one `N x N` distance pass per measurement). Pairwise sums are
accumulated over chunks of rows, so memory grows as `chunk_size * N`, never
`N^2`. The Gaussian-channel statistic is a TensorFlow function, usable inside
the traced local-rank measurement.

References:
    Kolchinsky & Tracey, "Estimating mixture entropy with pairwise
    distances", Entropy 19(7), 2017, https://arxiv.org/abs/1706.02419
    Saxe et al., "On the information bottleneck theory of deep learning",
    ICLR 2018, https://openreview.net/forum?id=ry_WPG-A-
    Shwartz-Ziv & Tishby, "Opening the black box of deep neural networks via
    information", 2017, https://arxiv.org/abs/1703.00810
    Patel & Shwartz-Ziv, "Learning to Compress: Local Rank and Information
    Compression in Deep Neural Networks", https://arxiv.org/abs/2410.07687
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from keras_localrank.inputs import as_samples
from keras_localrank.validation import check_finite_float, check_positive_int

__all__ = [
    "IXT",
    "ITY",
    "InformationEstimate",
    "check_labels",
    "pairwise_information",
    "kl_upper_bound",
    "bhattacharyya_lower_bound",
    "binned_information",
    "gaussian_channel_information",
    "gaussian_channel_stat",
    "gaussian_channel_estimate",
    "gaussian_channel_closed_form",
]

#: The two quantities of the information plane.
IXT = "I(X;T)"
ITY = "I(T;Y)"

_KINDS = ("upper_bound", "lower_bound", "estimate")
#: Rows of the pairwise-distance matrix held at once by default.
DEFAULT_CHUNK_SIZE = 256


@dataclasses.dataclass(frozen=True)
class InformationEstimate:
    """One information value and what it assumes.

    Attributes:
        quantity: `"I(X;T)"` or `"I(T;Y)"`.
        estimator: e.g. `"kl_upper"`, `"bd_lower"`, `"binning"`,
            `"gaussian_channel"` (see the estimator functions).
        kind: `"upper_bound"`, `"lower_bound"` or `"estimate"`.
        parameter: the name of the noise/discretisation parameter:
            `"sigma"` (noise std), `"num_bins"` or `"bin_width"`.
        parameter_value: its value.
        nats: the value in nats.
        num_samples: the number of samples it was computed from.
    """

    quantity: str
    estimator: str
    kind: str
    parameter: str
    parameter_value: float
    nats: float
    num_samples: int

    @property
    def bits(self) -> float:
        """The value in bits (`nats / log 2`)."""
        return self.nats / math.log(2.0)

    @property
    def label(self) -> str:
        """`<estimator>@<parameter>=<value>`, e.g. `kl_upper@sigma=0.1`."""
        return f"{self.estimator}@{self.parameter}={self.parameter_value:g}"


# -- input checks -----------------------------------------------------------------


def _check_representation(h, name: str = "h", *, minimum: int = 2) -> np.ndarray:
    """`h` as a float64 `[N, d]` array with at least `minimum` finite samples."""
    arr = as_samples(h, input_shape=None, name=name)
    if len(arr) < minimum:
        raise ValueError(
            f"Expected at least {minimum} samples in `{name}`. Received: {name} with "
            f"shape {arr.shape}."
        )
    return arr.reshape(len(arr), -1).astype(np.float64, copy=False)


def check_labels(labels, num_samples: int) -> np.ndarray:
    """Class labels (integers or strings, `[N]` or `[N, 1]`) as indices `[N]` in 0..C-1.

    Raises:
        ValueError: a shape other than `[N]`/`[N, 1]`, a length other than
            `num_samples`, NaN/Inf labels.
        TypeError: labels that are neither numbers nor strings.
    """
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(
            "Expected `labels` of shape (N,) with one class per sample. Received: labels "
            f"with shape {arr.shape}; for one-hot labels pass `labels.argmax(-1)`."
        )
    if len(arr) != num_samples:
        raise ValueError(
            f"Expected `labels` with one entry per sample ({num_samples}). Received: "
            f"labels with {len(arr)} entries."
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError("Expected finite `labels`. Received: NaN or Inf in labels.")
    if arr.dtype.kind not in "biuUSf":
        raise TypeError(f"Expected integer or string `labels`. Received: dtype {arr.dtype}.")
    _, inverse = np.unique(arr, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


def _check_sigmas(sigma) -> tuple[float, ...]:
    values = list(sigma) if isinstance(sigma, (list, tuple, np.ndarray)) else [sigma]
    if not values:
        raise ValueError(f"Expected at least one `sigma`. Received: sigma={sigma!r}")
    return tuple(check_finite_float("sigma", s, low=0.0, low_open=True) for s in values)


# -- noise injection: pairwise-distance bounds ---------------------------------------


def _log_kernel_means(
    h: np.ndarray, labels: np.ndarray | None, scales: Sequence[float], chunk_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """`log(1/N sum_j exp(-D_ij / c))` for each row `i` and scale `c`.

    Returns `[len(scales), N]` over all samples and, with labels, the same over
    the samples of `i`'s class (`1/N_y sum_{j in y_i}`). Rows are processed
    `chunk_size` at a time, in float64.
    """
    n = len(h)
    sq = np.einsum("ij,ij->i", h, h)
    out_all = np.empty((len(scales), n))
    out_within = None if labels is None else np.empty((len(scales), n))
    if labels is not None:
        log_class_sizes = np.log(np.bincount(labels).astype(np.float64))
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        d = sq[start:stop, None] + sq[None, :] - 2.0 * (h[start:stop] @ h.T)
        np.maximum(d, 0.0, out=d)
        rows = np.arange(stop - start)
        d[rows, start + rows] = 0.0  # exact zeros on the diagonal
        same = None if labels is None else labels[start:stop, None] == labels[None, :]
        for k, c in enumerate(scales):
            # Every exponent is <= 0 and the diagonal term is exp(0) = 1, so
            # the sums lie in [1, N]: no max-shift is needed for stability.
            w = np.exp(d * (-1.0 / c))
            out_all[k, start:stop] = np.log(w.sum(axis=1)) - math.log(n)
            if same is not None:
                out_within[k, start:stop] = (
                    np.log(np.where(same, w, 0.0).sum(axis=1))
                    - log_class_sizes[labels[start:stop]]
                )
    return out_all, out_within


def pairwise_information(
    h,
    sigma: float | Sequence[float],
    *,
    labels=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[InformationEstimate]:
    """Pairwise-distance bounds on the information of `T_s = h(X) + N(0, s^2 I)`.

    `X` is uniform over the `N` samples, so `T_s` is a mixture of `N`
    Gaussians `N(h_i, s^2 I)` and `I(X; T_s) = H(T_s) - H(T_s | X)` with
    `H(T_s | X)` known. Kolchinsky & Tracey bound the mixture entropy with the
    pairwise KL divergence (`D_ij / 2s^2`, an upper bound) and Bhattacharyya
    distance (`D_ij / 8s^2`, a lower bound); the component entropy cancels:

    - `kl_upper` (`I(X;T)`, upper bound) and `bd_lower` (`I(X;T)`, lower bound).

    With `labels`, `I(T_s; Y) = H(T_s) - H(T_s | Y)`, `H(T_s | Y)` the
    label-weighted entropies of the class mixtures:

    - `upper` (upper bound): KL bound on `H(T)` minus the Bhattacharyya bound
      on `H(T|Y)`; `lower` (lower bound): Bhattacharyya on `H(T)` minus KL on
      `H(T|Y)`, clipped at 0. These are guaranteed but loose.
    - `kl` (estimate, the one of Saxe et al. 2018) and `bd` (estimate): the
      same bound on both entropies. Their errors partly cancel; neither is a
      bound.

    Both `I(X;T)` bounds lie in `[0, log N]`: as an estimate for a
    continuous input distribution, a finite probe set caps them at `log N`.

    Args:
        h: `[N, ...]` float representations (flattened per sample), `N >= 2`.
        sigma: the noise standard deviation `s > 0`, or a sequence of them
            (the distances are computed once for all).
        labels: optional `[N]` class labels (integers or strings): also
            estimate `I(T;Y)`. Default None.
        chunk_size: rows of the distance matrix held at once; memory is
            `chunk_size * N` float64 values. Default 256.

    Returns:
        For each `sigma` in order: `kl_upper`, `bd_lower` (`I(X;T)`), then
        with labels `kl`, `bd`, `upper`, `lower` (`I(T;Y)`).

    Raises:
        ValueError: `sigma <= 0` or not finite, NaN/Inf in `h`, fewer than 2
            samples, `labels` of the wrong length or shape.
        TypeError: non-float `h`, non-numeric `sigma`, `chunk_size` not an int.

    Example:
        >>> h = np.random.default_rng(0).normal(size=(500, 3))
        >>> upper, lower = pairwise_information(h, 1.0)
        >>> lower.nats <= upper.nats
        True
    """
    h = _check_representation(h)
    sigmas = _check_sigmas(sigma)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    y = None if labels is None else check_labels(labels, len(h))
    scales = [c * s * s for s in sigmas for c in (2.0, 8.0)]
    log_all, log_within = _log_kernel_means(h, y, scales, chunk_size)
    n = len(h)
    out = []
    for k, s in enumerate(sigmas):
        kl_all, bd_all = -log_all[2 * k].mean(), -log_all[2 * k + 1].mean()

        def make(quantity, estimator, kind, nats, s=s):
            return InformationEstimate(quantity, estimator, kind, "sigma", s, float(nats), n)

        out += [
            make(IXT, "kl_upper", "upper_bound", kl_all),
            make(IXT, "bd_lower", "lower_bound", bd_all),
        ]
        if log_within is not None:
            kl_within, bd_within = -log_within[2 * k].mean(), -log_within[2 * k + 1].mean()
            out += [
                make(ITY, "kl", "estimate", kl_all - kl_within),
                make(ITY, "bd", "estimate", bd_all - bd_within),
                make(ITY, "upper", "upper_bound", kl_all - bd_within),
                make(ITY, "lower", "lower_bound", max(0.0, bd_all - kl_within)),
            ]
    return out


def kl_upper_bound(h, sigma: float, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> InformationEstimate:
    """Upper bound on `I(X; h(X) + N(0, sigma^2 I))` (pairwise KL; see `pairwise_information`)."""
    sigma = check_finite_float("sigma", sigma, low=0.0, low_open=True)
    return pairwise_information(h, sigma, chunk_size=chunk_size)[0]


def bhattacharyya_lower_bound(
    h, sigma: float, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> InformationEstimate:
    """Lower bound on `I(X; h(X) + N(0, sigma^2 I))` (pairwise Bhattacharyya)."""
    sigma = check_finite_float("sigma", sigma, low=0.0, low_open=True)
    return pairwise_information(h, sigma, chunk_size=chunk_size)[1]


# -- binning ------------------------------------------------------------------------


def _entropy_of_ids(ids: np.ndarray) -> float:
    counts = np.bincount(ids).astype(np.float64)
    p = counts[counts > 0] / len(ids)
    return float(-(p * np.log(p)).sum())


def binned_information(
    h,
    *,
    labels=None,
    num_bins: int | None = None,
    bin_width: float | None = None,
    value_range: tuple[float, float] | None = None,
) -> list[InformationEstimate]:
    """Information of the binned representation (Shwartz-Ziv & Tishby 2017).

    Each unit's value is put in a bin; a sample's binned representation is
    its tuple of bin indices. With `X` uniform over `N` **distinct** inputs and
    a deterministic layer, `I(X; T_binned) = H(T_binned)` (the empirical
    entropy of the patterns); `I(T_binned; Y) = H(T_binned) + H(Y) -
    H(T_binned, Y)`. Both are plug-in estimates (biased down for small `N`)
    and depend strongly on the bin size: `H(T_binned) <= log N`, it reaches
    `log N` as soon as bins separate all samples, and drops when a saturating
    activation pushes values into the same bins (Saxe et al. 2018).

    Args:
        h: `[N, ...]` float representations, `N >= 2`.
        labels: optional `[N]` class labels: also estimate `I(T;Y)`.
        num_bins: equal-width bins over `value_range` (all units share the
            bins; values outside it go to the edge bins). Exactly one of
            `num_bins` and `bin_width` is needed.
        bin_width: bins `[k w, (k+1) w)` for all integers `k` (unbounded).
        value_range: `(low, high)` for `num_bins`. Default None: the minimum
            and maximum of `h` (e.g. pass `(-1, 1)` for tanh, as the original
            study did).

    Returns:
        `[binning I(X;T)]`, plus `binning I(T;Y)` with labels; both of kind
        `"estimate"`, parameter `num_bins` or `bin_width`.

    Raises:
        ValueError: neither or both of `num_bins`/`bin_width`, a bin width
            <= 0, a bad `value_range`, NaN/Inf in `h`, fewer than 2 samples,
            mismatched labels.
        TypeError: non-float `h`, a non-integer `num_bins`.
    """
    h = _check_representation(h)
    if (num_bins is None) == (bin_width is None):
        raise ValueError(
            "Expected exactly one of `num_bins` and `bin_width`. Received: "
            f"num_bins={num_bins!r}, bin_width={bin_width!r}"
        )
    if num_bins is not None:
        num_bins = check_positive_int("num_bins", num_bins)
        if value_range is None:
            low, high = float(h.min()), float(h.max())
        else:
            if not isinstance(value_range, (tuple, list)) or len(value_range) != 2:
                raise ValueError(
                    f"Expected `value_range` = (low, high). Received: value_range={value_range!r}"
                )
            low = check_finite_float("value_range[0]", value_range[0])
            high = check_finite_float("value_range[1]", value_range[1])
            if high <= low:
                raise ValueError(
                    f"Expected `value_range` with low < high. Received: value_range={value_range!r}"
                )
        width = (high - low) / num_bins
        if width > 0:
            codes = np.clip(np.floor((h - low) / width), 0, num_bins - 1)
        else:  # all values equal: one bin
            codes = np.zeros_like(h)
        parameter, value = "num_bins", float(num_bins)
    else:
        width = check_finite_float("bin_width", bin_width, low=0.0, low_open=True)
        codes = np.floor(h / width)
        parameter, value = "bin_width", width
    _, patterns = np.unique(codes.astype(np.int64), axis=0, return_inverse=True)
    patterns = patterns.reshape(-1)
    n = len(h)
    h_t = _entropy_of_ids(patterns)
    out = [InformationEstimate(IXT, "binning", "estimate", parameter, value, h_t, n)]
    if labels is not None:
        y = check_labels(labels, n)
        joint = patterns * (int(y.max()) + 1) + y
        _, joint = np.unique(joint, return_inverse=True)
        ity = h_t + _entropy_of_ids(y) - _entropy_of_ids(joint.reshape(-1))
        out.append(InformationEstimate(ITY, "binning", "estimate", parameter, value, ity, n))
    return out


# -- local Gaussian channel ------------------------------------------------------------


def gaussian_channel_information(singular_values, sigma: float) -> tf.Tensor:
    """Per-sample `1/2 sum_i log(1 + s_i^2 / sigma^2)` in nats (float64).

    For `T_s = A X + N(0, sigma^2 I)` with `X ~ N(0, I)` this is exactly
    `I(X; T_s) = 1/2 log det(I + A A^T / sigma^2)`, `s_i` the singular values
    of `A`. Applied to the singular values of a layer's input Jacobian at `x`,
    it is the information of the layer linearised at `x`: a soft local rank
    that counts each direction by `log(1 + SNR)`, and tends to
    `rank/2 * log(1/sigma^2)` as `sigma -> 0`. Zero padding adds nothing, so
    the reduced spectra of the fast path give the same value.

    Graph-friendly (usable inside `tf.function` and under XLA).

    Args:
        singular_values: `[..., k]` non-negative singular values.
        sigma: the noise standard deviation, > 0.

    Returns:
        A `[...]` float64 tensor.

    Raises:
        ValueError: `sigma <= 0`, NaN or infinite.
        TypeError: a non-numeric `sigma`.
    """
    sigma = check_finite_float("sigma", sigma, low=0.0, low_open=True)
    s = tf.cast(singular_values, tf.float64)
    return 0.5 * tf.reduce_sum(tf.math.log1p(tf.square(s / sigma)), axis=-1)


def gaussian_channel_stat(sigma: float) -> Callable[[tf.Tensor], tf.Tensor]:
    """`s [B, k] -> [B]` Gaussian-channel information at `sigma`, for a spectral-stats hook.

    The returned function is named `gaussian_channel@sigma=<sigma>`.

    Raises:
        ValueError, TypeError: a bad `sigma` (checked now, not at call time).
    """
    sigma = check_finite_float("sigma", sigma, low=0.0, low_open=True)

    def stat(singular_values):
        return gaussian_channel_information(singular_values, sigma)

    stat.__name__ = f"gaussian_channel@sigma={sigma:g}"
    stat.sigma = sigma
    return stat


def gaussian_channel_estimate(per_sample, sigma: float) -> InformationEstimate:
    """The mean over samples of per-sample Gaussian-channel values, as an estimate.

    Args:
        per_sample: `[N]` values of `gaussian_channel_information` (nats).
        sigma: the `sigma` they were computed with.

    Raises:
        ValueError: an empty or non-finite `per_sample`, a bad `sigma`.
    """
    sigma = check_finite_float("sigma", sigma, low=0.0, low_open=True)
    values = _check_representation(np.asarray(per_sample, np.float64).reshape(-1, 1),
                                   "per_sample", minimum=1)
    return InformationEstimate(
        IXT, "gaussian_channel", "estimate", "sigma", sigma, float(values.mean()), len(values)
    )


def gaussian_channel_closed_form(a, sigma: float, covariance=None) -> float:
    """`I(X; A X + N(0, sigma^2 I)) = 1/2 log det(I + A Sigma A^T / sigma^2)` for `X ~ N(0, Sigma)`.

    Args:
        a: `[m, n]` matrix `A`.
        sigma: the noise standard deviation, > 0.
        covariance: `[n, n]` covariance `Sigma` of `X`. Default None: identity.

    Returns:
        The mutual information in nats.
    """
    sigma = check_finite_float("sigma", sigma, low=0.0, low_open=True)
    a = np.asarray(a, np.float64)
    cov = a @ a.T if covariance is None else a @ np.asarray(covariance, np.float64) @ a.T
    sign, logdet = np.linalg.slogdet(np.eye(len(a)) + cov / sigma**2)
    return 0.5 * float(logdet)
