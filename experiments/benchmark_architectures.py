r"""Benchmark: local rank of convnets and transformers built from stock Keras.

For each model it measures every measurable layer (or the layers a model's
recipe names) with `klr.local_rank` and prints the layers, samples, the
method used per layer, the wall time (tracing included: a user pays it),
and the peak resident-memory growth. In the same process it runs the
baseline, the engine's original path kept here verbatim in spirit (a
`tf.GradientTape.batch_jacobian` or forward-mode Jacobian of every layer,
materialised, then its spectrum from the float64 Gram matrix: the
`method="autodiff"` implementation before the matrix-free engine), on a
subset of samples small enough to finish, and prints the per-sample time
ratio and whether the ranks agree on the common samples.

Models (`--models`, comma-separated; default: all but resnet50_224):

- `mnist_convnet`: the keras.io "Simple MNIST convnet" (2 Conv2D + MaxPool +
  Dense), trained one epoch on MNIST; exact ranks.
- `cifar_cnn`: 32x32x3, three Conv2D + BatchNorm + ReLU + MaxPool blocks,
  global average pooling, Dense; trained one epoch on Fashion-MNIST resized to
  32x32x3 (or MNIST); robust rank with `--atol` (0.01).
- `mobilenetv2_32`, `resnet50_32`: `keras.applications` at 32x32x3,
  `weights=None` (random weights), every measurable layer.
- `transfer`: the transfer-learning pattern, MobileNetV2 (32x32) nested in a
  model with a new head: layers measured inside the nested base.
- `transformer`: one encoder block (MultiHeadAttention + LayerNorm + FFN) on
  (16, 32) inputs: attention projections and FFN layers.
- `resnet50_224`: ResNet50 at 224x224x3, one last-stage layer and the head,
  2 inputs, `--atol`; no baseline (one Jacobian of that layer is 60 GB).

`--quick` uses a few samples, and for the large models only the last
convolution and the head, to validate the script in minutes.

    python -m experiments.benchmark_architectures --quick \
        --data_path=/path/to/mnist10k.npz
    python -m experiments.benchmark_architectures --models=mnist_convnet,cifar_cnn \
        --data_path=/path/to/mnist10k.npz
"""

from __future__ import annotations

import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_localrank as klr  # noqa: E402
from keras_localrank import datasets  # noqa: E402
from experiments.common import PeakRSS, run  # noqa: E402
from keras_localrank.io import atomic_write_json  # noqa: E402
from keras_localrank.taps import preactivation  # noqa: E402

MODELS = (
    "mnist_convnet",
    "cifar_cnn",
    "mobilenetv2_32",
    "resnet50_32",
    "transfer",
    "transformer",
    "resnet50_224",
)
DEFAULT_MODELS = [m for m in MODELS if m != "resnet50_224"]

FLAGS = flags.FLAGS
flags.DEFINE_list("models", DEFAULT_MODELS, f"Models to run, among {MODELS}.")
flags.DEFINE_bool("quick", False, "Few samples; large models: last conv and head only.")
flags.DEFINE_string("data", "mnist", "Training data of the convnets: mnist or fashion_mnist.")
flags.DEFINE_string("data_path", None, "An .npz (x, y) of MNIST digits read instead of "
                    "downloading (e.g. /path/to/mnist10k.npz).")
flags.DEFINE_integer("train_samples", 6000, "Training images for the one epoch.")
flags.DEFINE_float("atol", 0.01, "Robust-rank threshold of cifar_cnn and resnet50_224.")
flags.DEFINE_string("method", "auto", "`method` passed to klr.local_rank.")
flags.DEFINE_bool("spectrum", True, "`spectrum` passed to klr.local_rank (--nospectrum: "
                  "ranks counted without singular values on the exact path).")
flags.DEFINE_integer("samples", None, "Override the measured samples of every model.")
flags.DEFINE_integer("baseline_samples", None, "Override the baseline's samples (0: skip).")
flags.DEFINE_integer("memory_budget_mib", None, "`memory_budget` passed to klr.local_rank, "
                     "in MiB (default: the package's 2 GiB).")
flags.DEFINE_list("layers", None, "Measure only these layers (tap names) of every model.")
flags.DEFINE_integer("check_exact", 0, "Also measure the first N samples with "
                     "method='exact' (same atol) and compare per layer and sample.")
flags.DEFINE_string("output", None, "Write the figures to this .json file.")
flags.DEFINE_integer("seed", 0, "Seed of weights, data and training.")


# -- memory ----------------------------------------------------------------------------


# -- the baseline: materialised Jacobians + decomposition (kept here) -----------------------


def baseline_local_rank(model, x, layer_names, *, atol=None, batch_size=None):
    """Per-sample ranks by the original autodiff path (top-level layers only).

    Materialises every per-sample Jacobian `[n_l, n0]` (reverse mode by
    `batch_jacobian`, or forward mode with the input repeated `n0` times when
    `n0` is smaller than the total measured output), then takes singular
    values from the float64 Gram matrix of the smaller side and counts those
    above `max(atol, eps32 * max(n_l, n0) * sigma_max)` (numpy's rule without
    `atol`).

    `batch_size` None: the original automatic chunk, as many samples as keep
    all Jacobians of a chunk under 2**25 elements (at least 1, at most 128).

    Returns:
        `{layer name: [N] int ranks}`.
    """
    layers = [model.get_layer(name) for name in layer_names]
    features = keras.Model(model.inputs[0], [layer.input for layer in layers])
    n0 = math.prod(x.shape[1:])
    units = [math.prod(layer.output.shape[1:]) for layer in layers]
    mode = "forward" if n0 < sum(units) else "reverse"
    if batch_size is None:
        batch_size = max(1, min(128, 2**25 // (sum(units) * n0)))
    eps = float(np.finfo(np.float32).eps)

    def preacts(inputs):
        hs = features(inputs, training=False)
        hs = hs if isinstance(hs, (list, tuple)) else [hs]
        batch = tf.shape(inputs)[0]
        return [tf.reshape(preactivation(la, h), [batch, -1]) for la, h in zip(layers, hs)]

    @tf.function(autograph=False)
    def chunk(xb):
        batch = tf.shape(xb)[0]
        if mode == "reverse":
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(xb)
                ps = preacts(xb)
            jacs = [tf.reshape(tape.batch_jacobian(p, xb), [batch, u, n0])
                    for p, u in zip(ps, units)]
        else:
            rep = tf.repeat(xb, n0, axis=0)
            basis = tf.reshape(tf.tile(tf.eye(n0, dtype=xb.dtype), [batch, 1]), tf.shape(rep))
            with tf.autodiff.ForwardAccumulator(rep, basis) as acc:
                ps = preacts(rep)
            jacs = [tf.linalg.matrix_transpose(tf.reshape(acc.jvp(p), [batch, n0, u]))
                    for p, u in zip(ps, units)]
        ranks = []
        for jac, u in zip(jacs, units):
            j64 = tf.cast(jac, tf.float64)
            tall = u >= n0
            gram = tf.linalg.matmul(j64, j64, transpose_a=tall, transpose_b=not tall)
            s = tf.sqrt(tf.maximum(tf.linalg.eigvalsh(gram), 0.0))
            smax = tf.reduce_max(s, axis=-1)
            tol = tf.maximum(tf.constant(atol or 0.0, tf.float64), eps * max(u, n0) * smax)
            ranks.append(tf.reduce_sum(tf.cast(s > tol[:, None], tf.int32), axis=-1))
        return ranks

    out = {name: [] for name in layer_names}
    for start in range(0, len(x), batch_size):
        for name, r in zip(layer_names, chunk(tf.constant(x[start : start + batch_size]))):
            out[name].append(r.numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


# -- data and models ---------------------------------------------------------------------


def load_images(size: int, channels: int):
    """Training and measurement images at `size` x `size` x `channels` in [0, 1]."""
    ds = datasets.load(FLAGS.data, data_path=FLAGS.data_path, flatten=False,
                       seed=FLAGS.seed, n_train=FLAGS.train_samples, n_test=512)

    def prep(x):
        x = x[..., None]
        if size != x.shape[1]:
            x = tf.image.resize(x, (size, size)).numpy()
        return np.repeat(x, channels, axis=-1).astype("float32")

    return prep(ds.x_train), ds.y_train, prep(ds.x_test)


def train_one_epoch(model, x, y):
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    hist = model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    print(f"   trained 1 epoch on {len(x)} images in {time.perf_counter() - start:.0f} s "
          f"(accuracy {hist.history['accuracy'][-1]:.3f})")


def mnist_convnet():
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, (3, 3), activation="relu"),
        keras.layers.MaxPooling2D((2, 2)),
        keras.layers.Conv2D(64, (3, 3), activation="relu"),
        keras.layers.MaxPooling2D((2, 2)),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax"),
    ], name="mnist_convnet")
    x_train, y_train, x = load_images(28, 1)
    train_one_epoch(model, x_train, y_train)
    return model, x


def cifar_cnn():
    inputs = keras.Input((32, 32, 3))
    h = inputs
    for filters in (32, 64, 128):
        h = keras.layers.Conv2D(filters, 3, padding="same")(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(h), name="cifar_cnn")
    x_train, y_train, x = load_images(32, 3)
    train_one_epoch(model, x_train, y_train)
    return model, x


def random_images(shape, n=64):
    return np.random.default_rng(FLAGS.seed).uniform(0, 1, (n, *shape)).astype("float32")


def mobilenetv2_32():
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, classes=10)
    return model, random_images((32, 32, 3))


def resnet50_32():
    model = keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None, classes=10)
    return model, random_images((32, 32, 3))


def transfer():
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False,
                                          weights=None)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(h), name="transfer")
    return model, random_images((32, 32, 3))


def transformer():
    inputs = keras.Input((16, 32))
    att = keras.layers.MultiHeadAttention(4, 8, name="mha")(inputs, inputs)
    h = keras.layers.LayerNormalization()(keras.layers.Add()([inputs, att]))
    f = keras.layers.Dense(64, activation="relu", name="ffn1")(h)
    f = keras.layers.Dense(32, name="ffn2")(f)
    out = keras.layers.LayerNormalization()(keras.layers.Add()([h, f]))
    model = keras.Model(inputs, out, name="transformer")
    x = np.random.default_rng(FLAGS.seed).standard_normal((512, 16, 32)).astype("float32")
    return model, x


def resnet50_224():
    model = keras.applications.ResNet50(input_shape=(224, 224, 3), weights=None)
    return model, random_images((224, 224, 3), n=2)


#: model -> (builder, samples, baseline samples, atol, quick samples, quick baseline,
#:           layers in quick mode: None = all, "tail" = last conv + head, or names)
RECIPES = {
    "mnist_convnet": (mnist_convnet, 256, 8, None, 16, 2, None),
    "cifar_cnn": (cifar_cnn, 64, 1, "atol", 4, 1, "tail"),
    "mobilenetv2_32": (mobilenetv2_32, 16, 1, None, 1, 1, "tail"),
    "resnet50_32": (resnet50_32, 16, 1, None, 1, 1, "tail"),
    "transfer": (transfer, 16, 0, None, 1, 0, "tail"),
    "transformer": (transformer, 256, 16, None, 16, 4, None),
    "resnet50_224": (resnet50_224, 2, 0, "atol", 1, 0, ["conv5_block3_3_conv", "predictions"]),
}


def eigen_floor(model, result, repeats: int = 4) -> float:
    """Seconds per sample spent by float64 eigen-decompositions alone: one
    `min(n_l, n0)` Gram per exact layer that is not affine in the input (those
    are measured once per call), timed on random Grams. No exact path that
    decomposes the Gram per sample can go below it."""
    from keras_localrank.factor import is_constant_tap

    taps = {t.name: t for t in klr.taps.select_taps(model).taps}
    total = 0.0
    for info in result.layers:
        tap = taps.get(info.name)
        if info.method != "exact" or tap is None or is_constant_tap(model, tap):
            continue
        n = min(info.units, info.input_dim)
        a = np.random.default_rng(0).standard_normal((repeats, n, n))
        gram = tf.constant(a @ np.swapaxes(a, 1, 2))
        tf.linalg.eigvalsh(gram[:1]).numpy()
        start = time.perf_counter()
        tf.linalg.eigvalsh(gram).numpy()
        total += (time.perf_counter() - start) / repeats
    return total


def tail_layers(model) -> list[str]:
    """The last convolution and the head (tap names)."""
    names = [t.name for t in klr.taps.select_taps(model).taps]
    convs = [n for n in names if "conv" in n.lower()]
    return [convs[-1], names[-1]] if convs and convs[-1] != names[-1] else names[-2:]


def check_exact(model, x, result, layers, atol) -> dict:
    """Exact ranks of the first samples against `result` (estimates and,
    for randomized layers, their certified interval `[rank, upper]`)."""
    n = len(x)
    with PeakRSS() as mem:
        start = time.perf_counter()
        exact = klr.local_rank(model, x, layers=layers, atol=atol, method="exact")
        seconds = time.perf_counter() - start
    print(f"   exact check on {n} sample(s): {seconds:.1f} s, peak RSS growth "
          f"{mem.growth_mib:.0f} MiB")
    print("      layer     method  exact (per sample)  estimate  upper  "
          "max|est-exact|  in interval")
    worst, inside = 0, True
    for info in result.layers:
        ref = exact.per_sample[info.name]
        est = result.per_sample[info.name][:n]
        upper = result.upper_per_sample[info.name][:n]
        diff = int(np.max(np.abs(est - ref)))
        holds = bool(np.all((est <= ref) & (ref <= upper)))
        worst, inside = max(worst, diff), inside and holds
        print(f"   {info.name:>10} {info.method:>10}  {ref.tolist()}  {est.tolist()}  "
              f"{upper.tolist()}  {diff}  {'yes' if holds else 'NO'}")
    print(f"   largest |estimate - exact| over layers and samples: {worst} "
          f"({'within' if worst <= 1 else 'OUTSIDE'} +-1); exact inside every interval: "
          f"{'yes' if inside else 'NO'}")
    return {"samples": n, "seconds": seconds, "max_abs_diff": worst, "inside": inside}


def run_model(name: str) -> dict:
    build, samples, base_samples, atol, q_samples, q_base, q_layers = RECIPES[name]
    keras.utils.set_random_seed(FLAGS.seed)
    model, x = build()
    atol = FLAGS.atol if atol == "atol" else None
    if FLAGS.quick:
        samples, base_samples = q_samples, q_base
        layers = tail_layers(model) if q_layers == "tail" else q_layers
    else:
        layers = q_layers if isinstance(q_layers, list) else None
    if FLAGS.layers:
        layers = list(FLAGS.layers)
    samples = FLAGS.samples or samples
    if FLAGS.baseline_samples is not None:
        base_samples = FLAGS.baseline_samples
    x = x[:samples]
    if len(x) < samples:
        x = np.concatenate([x] * math.ceil(samples / len(x)))[:samples]
    print(f"\n== {name}: {model.count_params():,} parameters, input {x.shape[1:]}, "
          f"{samples} samples, {'exact' if atol is None else f'atol={atol}'} rank"
          f"{'' if FLAGS.spectrum else ', spectrum=False (ranks counted)'}")
    with PeakRSS() as mem:
        start = time.perf_counter()
        budget = {} if FLAGS.memory_budget_mib is None else {
            "memory_budget": FLAGS.memory_budget_mib * 2**20}
        result = klr.local_rank(model, x, layers=layers, atol=atol, method=FLAGS.method,
                                spectrum=FLAGS.spectrum, **budget)
        t_new = time.perf_counter() - start
    frame = result.to_frame()
    # The randomized layers' error statement: the certified interval
    # [rank, upper] holds with probability >= 1 - failure_probability.
    randomized = any(info.method == "randomized" for info in result.layers)
    columns = [c for c in frame.columns if c in (
        "layer", "class", "units", "bound", "method", "mean", "std", "min", "max")
        or "error" in c or "margin" in c or "stderr" == c
        or (randomized and c in ("upper", "failure_probability", "sketch_size"))]
    print(frame[columns].to_string(
        index=False, float_format=lambda v: f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.0e}"
    ))
    if result.skipped:
        print(f"   not measured: {result.skipped}")
    counts = {}
    for info in result.layers:
        counts[info.method] = counts.get(info.method, 0) + 1
    methods = [f"{m} {c}" for m, c in sorted(counts.items())]
    print(f"   new: {len(result.layers)} layers ({', '.join(methods)}), {t_new:.1f} s "
          f"({t_new / samples:.3f} s/sample), peak RSS growth {mem.growth_mib:.0f} MiB")
    record = {"model": name, "layers": len(result.layers), "samples": samples,
              "methods": {i.name: i.method for i in result.layers}, "seconds": t_new,
              "peak_rss_mib": mem.growth_mib, "atol": atol,
              "per_layer": {
                  info.name: {
                      "mean": result.mean[info.name],
                      "upper": result.upper[info.name],
                      "failure_probability": info.failure_probability,
                      "per_sample": result.per_sample[info.name].tolist(),
                      "upper_per_sample": result.upper_per_sample[info.name].tolist(),
                  }
                  for info in result.layers
              }}
    if FLAGS.check_exact:
        record["check_exact"] = check_exact(model, x[: FLAGS.check_exact], result, layers, atol)
    top_level = {layer.name for layer in model.layers}
    base_layers = [i.name for i in result.layers if i.name in top_level]
    if base_samples and base_layers:
        xb = x[:base_samples]
        with PeakRSS() as mem_b:
            start = time.perf_counter()
            ranks = baseline_local_rank(model, xb, base_layers, atol=atol)
            t_base = time.perf_counter() - start
        agree = all(np.array_equal(ranks[n], result.per_sample[n][:base_samples])
                    for n in base_layers)
        ratio = (t_base / base_samples) / (t_new / samples)
        print(f"   baseline (batch_jacobian + decomposition) on {base_samples} sample(s), "
              f"{len(base_layers)} layers: {t_base:.1f} s ({t_base / base_samples:.3f} "
              f"s/sample), peak RSS growth {mem_b.growth_mib:.0f} MiB")
        extra = ("" if len(base_layers) == len(result.layers) else
                 f" (conservative: the new path measured {len(result.layers)} layers, "
                 f"the baseline only the {len(base_layers)} it can reach)")
        print(f"   ratio (baseline / new, per sample): {ratio:.1f}x{extra}; ranks identical "
              f"on the common samples and layers: {'yes' if agree else 'NO'}")
        record.update(baseline_samples=base_samples, baseline_seconds=t_base,
                      baseline_peak_rss_mib=mem_b.growth_mib, ratio=ratio, agree=agree)
        floor = eigen_floor(model, result) if FLAGS.spectrum else 0.0
        if floor > 0:
            print(f"   eigen-decomposition floor of the exact path: {floor:.3f} s/sample "
                  f"(baseline / floor = {t_base / base_samples / floor:.1f}x at most)")
            record.update(eigen_floor_seconds=floor)
    else:
        print("   baseline: not run (" + ("no top-level layer" if not base_layers
                                          else "out of reach or disabled") + ")")
    return record


def main(argv):
    del argv
    unknown = [m for m in FLAGS.models if m not in MODELS]
    if unknown:
        raise app.UsageError(f"Unknown models {unknown}; choose among {MODELS}.")
    load = os.getloadavg()
    print(f"keras_localrank architectures benchmark; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; quick={FLAGS.quick}")
    records = [run_model(name) for name in FLAGS.models]
    if FLAGS.output:
        atomic_write_json(FLAGS.output, records)
        print(f"Wrote {FLAGS.output}")
    print(json.dumps([{k: r[k] for k in ("model", "samples", "seconds", "peak_rss_mib")}
                      | ({"ratio": round(r["ratio"], 1)} if "ratio" in r else {})
                      for r in records]))


if __name__ == "__main__":
    run(main)
