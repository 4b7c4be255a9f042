r"""Local rank over training: a 4x200 ReLU MLP on 1,000 MNIST digits.

Presets: `default` (AdamW lr 1e-3, weight decay 1.0 on kernels, batch 64, 600
epochs = 9,600 steps: the compression phase within minutes on 2 CPU cores),
`paper` (the paper's lr 1e-4, weight decay 0.01, 10^6 steps, ~50
log-spaced measurements) and `authors` (`paper` with the protocol of the
authors' code: --loss=double_softmax, --adam_epsilon=1e-8 (PyTorch's),
--input_scaling=standardize, --init=normal_fan_in, --rank_on=test
--rank_samples=128, random 1,000-image subsets, their floor log grid).
Example (offline, with the bundled digits):

    python -m experiments.mnist_mlp --data_path=/path/to/mnist10k.npz \
        --workdir=runs/mnist_mlp

Without --data_path MNIST is downloaded by `keras.datasets.mnist`. Run it
again with the same --workdir to resume. Outputs: see
`keras_localrank/studies/dynamics.py`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from experiments import common, dynamics_flags

dynamics_flags.define_flags(
    workdir="runs/mnist_mlp",
    presets={"default": "mnist", "paper": "mnist_paper", "authors": "mnist_authors"},
)


def main(argv):
    del argv
    dynamics_flags.run_from_flags()


if __name__ == "__main__":
    common.run(main)
