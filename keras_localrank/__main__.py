"""`python -m keras_localrank`: the local-rank table of a model (absl flags).

With no flags: trains a small MLP on synthetic Gaussian data for a few
seconds and prints the per-layer local-rank table before and after training.

    python -m keras_localrank
    python -m keras_localrank --model=model.keras --data=digits --atol=1e-2
    python -m keras_localrank --model=model.keras --data=mnist --output=table.csv
    python -m keras_localrank --model=model.keras --data=mnist \
        --data_path=mnist.npz --output=table.csv   # offline: an .npz with x, y

Bad input (flags, a missing, truncated or corrupt file, an output path that
cannot be written) ends with one line on stderr and exit status 2.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A saved .keras model; default: train the demo MLP.")
flags.DEFINE_string(
    "data", "gaussian", "gaussian, digits, mnist, fashion_mnist, or an .npz with an x array."
)
flags.DEFINE_string("data_path", None, "An .npz (x, y) read instead of downloading MNIST.")
flags.DEFINE_integer("samples", 512, "Number of samples to measure on.")
flags.DEFINE_float("atol", None, "Absolute singular-value threshold (robust rank).")
flags.DEFINE_float("rtol", None, "Relative threshold (default: numpy's rule).")
flags.DEFINE_list("layers", None, "Layer names to measure (default: all measurable).")
flags.DEFINE_string("output", None, "Write the table to this .csv or .json file.")
flags.DEFINE_integer("epochs", 30, "Training epochs of the demo MLP.")
flags.DEFINE_integer("seed", 0, "Seed of data, weights and training.")
flags.DEFINE_enum(
    "method",
    "auto",
    ["auto", "analytic", "exact", "randomized", "autodiff", "autodiff-reverse",
     "autodiff-forward"],
    "Jacobian path.",
)
flags.DEFINE_enum("dtype", None, ["float32", "float64"], "Precision of the Jacobians.")
flags.DEFINE_integer("batch_size", None, "Samples per chunk (default: automatic).")
flags.DEFINE_bool("jit_compile", False, "Run the measurement under XLA.")
flags.DEFINE_bool("spectrum", True, "--nospectrum counts the exact ranks without singular "
                  "values (faster on large convnets; no effective rank in the table).")
flags.DEFINE_string(
    "wrt", None, "Layer whose output is differentiated (e.g. embedding for a text model)."
)
flags.DEFINE_bool("safe_mode", True, "Keras safe_mode: --nosafe_mode loads Lambda layers "
                  "(only for model files you trust).")
flags.DEFINE_list("imports", None, "Modules to import before loading --model (they define "
                  "and register its custom layers).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        from keras_localrank.cli import Config, run

        run(
            Config(
                model=FLAGS.model, data=FLAGS.data, data_path=FLAGS.data_path,
                samples=FLAGS.samples, atol=FLAGS.atol, rtol=FLAGS.rtol,
                layers=FLAGS.layers, output=FLAGS.output, epochs=FLAGS.epochs,
                seed=FLAGS.seed, method=FLAGS.method, dtype=FLAGS.dtype,
                batch_size=FLAGS.batch_size, jit_compile=FLAGS.jit_compile,
                wrt=FLAGS.wrt, safe_mode=FLAGS.safe_mode, imports=FLAGS.imports,
                spectrum=FLAGS.spectrum,
            )
        )
    except (ValueError, TypeError, OSError, ImportError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
