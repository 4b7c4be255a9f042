"""compress: shrink Keras 3 models with measured local rank, and re-evaluate.

Run `python -m compress --help` for the app. The library:

- `local_rank_compress`: data-aware pruning and factorization, ranks floored
  by the measured local rank; `weight_svd` and (lazily, through `tf_keras`)
  `compress.tfmot_bridge.magnitude_prune` are the baselines.
- Policies (`ParamFraction`, `GreedyParamFraction`, `EnergyFraction`,
  `AccuracyTolerance`) choose ranks; `LowRankDense` is the serializable
  factorized layer.
- `count_params`, `count_macs`, `measure` evaluate; `finetune` fine-tunes at
  a low learning rate and keeps the best epoch on validation data; `run`
  does it all.

References:
    Patel & Shwartz-Ziv, "Learning to Compress: Local Rank and Information
    Compression in Deep Neural Networks", https://arxiv.org/abs/2410.07687
"""

from compress.app import CompressionConfig, load_model, run
from compress.baselines import weight_svd
from compress.data_aware import local_rank_compress, local_rank_floors
from compress.evaluate import FineTuned, finetune, measure
from compress.layers import LowRankDense
from compress.outcome import Compressed
from compress.policies import (
    AccuracyTolerance,
    Candidate,
    EnergyFraction,
    GreedyParamFraction,
    ParamFraction,
    RankPolicy,
    get_policy,
)
from compress.registry import count_macs, count_params
from compress.surgery import factorize, prune_units

__all__ = [
    "AccuracyTolerance",
    "Candidate",
    "Compressed",
    "CompressionConfig",
    "EnergyFraction",
    "FineTuned",
    "GreedyParamFraction",
    "LowRankDense",
    "ParamFraction",
    "RankPolicy",
    "count_macs",
    "count_params",
    "factorize",
    "finetune",
    "get_policy",
    "load_model",
    "local_rank_compress",
    "local_rank_floors",
    "measure",
    "prune_units",
    "run",
    "weight_svd",
]
