"""CPU latency of an original model against its compressed versions, side by side.

Loads the original `.keras` model and each compressed one, then times them
in interleaved rounds (original, compressed, original, ...) so that a load
change on a shared machine hits every model alike. Each round takes the
median of `--runs` batches (`compress.evaluate.latency_ms`); the figure
reported is the median over `--rounds` rounds, at batch 1 and batch 64,
with the ratio original / compressed. The load average (`os.getloadavg`) is
printed before and after and written into the JSON beside the figures.

    python -m experiments.compress_latency --original=runs/cc/cnn.keras \\
        --compressed=runs/cc/compress_cnn/models/cnn_local_rank_b0.3.keras
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("original", None, "The original `.keras` model.")
flags.DEFINE_multi_string("compressed", [], "Compressed `.keras` models.")
flags.DEFINE_integer("runs", 20, "Timed batches per round (the round's median).")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds (the median over rounds is reported).")
flags.DEFINE_multi_integer("batch", [1, 64], "Batch sizes.")
flags.DEFINE_string("output", None, "Optional JSON output path.")


def compare(original: str, compressed, *, batches=(1, 64), runs: int = 20, rounds: int = 5):
    """Median latencies (ms) and ratios original / compressed, timed interleaved.

    Args:
        original: path of the original `.keras` model.
        compressed: paths of compressed `.keras` models.
        batches: batch sizes to time.
        runs: timed batches per round, >= 1.
        rounds: interleaved rounds, >= 1.

    Returns:
        `{"load_before", "load_after", "models": {path: {"ms_b<n>": ...,
        "ratio_b<n>": ...}}}`.
    """
    import numpy as np

    from compress.app import load_model
    from compress.evaluate import latency_ms
    from keras_localrank.validation import check_positive_int

    check_positive_int("runs", runs)
    check_positive_int("rounds", rounds)
    paths = [original, *compressed]
    models = {p: load_model(p) for p in paths}
    x = np.random.default_rng(0).random((max(batches), 28, 28, 1), dtype=np.float32)
    load_before = os.getloadavg()
    times = {p: {b: [] for b in batches} for p in paths}
    for _ in range(rounds):
        for b in batches:
            for p in paths:
                times[p][b].append(latency_ms(models[p], x, batch_size=b, runs=runs))
    load_after = os.getloadavg()
    medians = {p: {b: float(np.median(times[p][b])) for b in batches} for p in paths}
    out = {"load_before": load_before, "load_after": load_after, "models": {}}
    for p in paths:
        row = {f"ms_b{b}": medians[p][b] for b in batches}
        row.update({f"ratio_b{b}": medians[original][b] / medians[p][b] for b in batches})
        out["models"][p] = row
    return out


def main(argv):
    del argv
    if not FLAGS.original:
        raise ValueError("Expected `--original`. Received: original=None")
    result = compare(
        FLAGS.original, FLAGS.compressed, batches=tuple(FLAGS.batch),
        runs=FLAGS.runs, rounds=FLAGS.rounds,
    )
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*result["load_before"]))
    for path, row in result["models"].items():
        cells = "  ".join(
            f"b{b}: {row[f'ms_b{b}']:.2f} ms (x{row[f'ratio_b{b}']:.2f})" for b in FLAGS.batch
        )
        print(f"{os.path.basename(path)}  {cells}")
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*result["load_after"]))
    if FLAGS.output:
        from keras_localrank.io import atomic_write_json

        atomic_write_json(FLAGS.output, result)
    else:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    common.run(main)
