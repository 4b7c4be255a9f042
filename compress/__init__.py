"""compress: shrink Keras 3 models with measured local rank, and re-evaluate.

Run `python -m compress --help` for the app. The library:

- `local_rank_compress`: data-aware pruning and factorization of Dense,
  Conv1D and Conv2D layers (BatchNorm folded, constant channels removed),
  ranks floored by the measured local rank, on a budget of parameters or
  MACs; `weight_svd`, `weight_factorize` (weight SVD, spatial, Tucker-2 for
  convolutions) and (lazily, through `tf_keras`)
  `compress.tfmot_bridge.magnitude_prune` are the baselines.
- `fold_batchnorm`, `prune_constant_channels` and `factorize_convs` are the
  convnet rewrites on their own.
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
from compress.channels import ChannelPruning, prune_constant_channels
from compress.conv import ConvFactors, factorize_convs
from compress.costs import MACS, PARAMS, CostModel, LayerShape
from compress.data_aware import conv_channel_floors, local_rank_compress, local_rank_floors
from compress.distill import DistillationLoss
from compress.evaluate import FineTuned, finetune, measure
from compress.folding import FoldRecord, fold_batchnorm
from compress.layers import LowRankDense
from compress.outcome import Compressed
from compress.policies import (
    AccuracyTolerance,
    Candidate,
    EnergyFraction,
    GreedyParamFraction,
    InfeasibleBudgetError,
    ParamFraction,
    RankPolicy,
    get_policy,
)
from compress.macs import count_macs
from compress.registry import count_params
from compress.surgery import factorize, prune_units
from compress.weight_only import weight_factorize

__all__ = [
    "MACS",
    "PARAMS",
    "AccuracyTolerance",
    "Candidate",
    "ChannelPruning",
    "Compressed",
    "CompressionConfig",
    "DistillationLoss",
    "ConvFactors",
    "CostModel",
    "EnergyFraction",
    "FineTuned",
    "FoldRecord",
    "GreedyParamFraction",
    "InfeasibleBudgetError",
    "LayerShape",
    "LowRankDense",
    "ParamFraction",
    "RankPolicy",
    "conv_channel_floors",
    "count_macs",
    "count_params",
    "factorize",
    "factorize_convs",
    "finetune",
    "fold_batchnorm",
    "get_policy",
    "load_model",
    "local_rank_compress",
    "local_rank_floors",
    "measure",
    "prune_constant_channels",
    "prune_units",
    "run",
    "weight_factorize",
    "weight_svd",
]
