"""keras_localrank: local rank of neural-network layers for Keras 3.

Local rank is the expected numerical rank of a layer's pre-activation
Jacobian with respect to the input (Patel & Shwartz-Ziv,
https://arxiv.org/abs/2410.07687).

The engine needs Keras' TensorFlow backend. Study modules (`vib`,
`dynamics`, `plotting`) are imported on first use, so measuring a model
imports neither TensorFlow Probability nor matplotlib.
"""

import importlib
import json
import os
import sys


def _keras_backend() -> str:
    """The backend Keras uses or will use, read without importing Keras.

    Keras' own order: an already imported Keras, then `KERAS_BACKEND`, then
    `backend` in `$KERAS_HOME/keras.json` (default `~/.keras`), else TensorFlow.
    """
    if "keras" in sys.modules and hasattr(sys.modules["keras"], "backend"):
        try:
            return sys.modules["keras"].backend.backend()
        except AttributeError:  # keras only partly imported
            pass
    if "KERAS_BACKEND" in os.environ:
        return os.environ["KERAS_BACKEND"]
    if "KERAS_HOME" in os.environ:
        home = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(os.path.expanduser(home), "keras.json"), encoding="utf-8") as f:
            return str(json.load(f).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


if _keras_backend() != "tensorflow":
    raise ImportError(
        "keras_localrank needs the TensorFlow backend of Keras; set "
        "KERAS_BACKEND=tensorflow (received backend "
        f"{_keras_backend()!r}) before importing keras."
    )

from keras_localrank import datasets, information, layers, metrics, schedules  # noqa: E402
from keras_localrank.callbacks import LocalRankCallback  # noqa: E402
from keras_localrank.estimate import LocalRankEstimator, local_rank  # noqa: E402
from keras_localrank.information_callback import InformationCallback  # noqa: E402
from keras_localrank.layers import GaussianBottleneck, RankProbe, SampleAverage  # noqa: E402
from keras_localrank.result import LayerInfo, LocalRankResult  # noqa: E402
from keras_localrank.scheduled import ScheduledCallback  # noqa: E402
from keras_localrank.spectra import (  # noqa: E402
    Tolerance,
    effective_rank,
    rank_from_singular_values,
    stable_rank,
)
from keras_localrank.taps import MEASURABLE_LAYERS  # noqa: E402

__version__ = "0.1.0"

#: Submodules imported on first attribute access (`keras_localrank.vib`).
_LAZY_MODULES = ("dynamics", "plotting", "vib")


def __getattr__(name):
    if name in _LAZY_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES))


__all__ = [
    "GaussianBottleneck",
    "InformationCallback",
    "LayerInfo",
    "LocalRankCallback",
    "LocalRankEstimator",
    "LocalRankResult",
    "MEASURABLE_LAYERS",
    "RankProbe",
    "SampleAverage",
    "ScheduledCallback",
    "Tolerance",
    "effective_rank",
    "datasets",
    "dynamics",
    "information",
    "layers",
    "local_rank",
    "metrics",
    "plotting",
    "schedules",
    "rank_from_singular_values",
    "stable_rank",
    "vib",
]
