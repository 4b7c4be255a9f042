"""Where does a compressed convnet lose accuracy? Allocation, rewrite, fine-tuning.

For one trained model at one budget (default 30% of MACs) with the
local-rank method, on the same splits as `python -m compress`:

1. **Allocation**: test accuracy before fine-tuning with the greedy
   (held-out loss) allocation and with one shared energy threshold.
2. **Rewrite error by layer**: the rise of the held-out loss when only one
   layer is rewritten at its chosen rank (`Compressed.layer_loss`), and the
   test accuracy of the full-rank rewrite (BatchNorm folded, constant
   channels removed: it must equal the original's).
3. **Fine-tuning schedule**: the greedy model fine-tuned for
   `--finetune_epochs` with a constant learning rate of a tenth of the
   training one (the app's default), a cosine decay from the training rate,
   and the cosine decay with distillation from the original; and the
   *original* fine-tuned the same way (a control: how much of the recovery
   is just more training of an under-trained original).

Writes `diagnosis.json` and `diagnosis.md` into `--workdir`.

    python -m experiments.compress_diagnose --model=runs/cc/resnet.keras \
        --workdir=runs/diagnose_resnet --n_train=10000 --n_test=10000
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

FLAGS = flags.FLAGS

#: Fine-tuning variants: name -> (learning rate, schedule, distillation share).
VARIANTS = {
    "constant 1e-4": (1e-4, "constant", 0.0),
    "cosine 1e-3": (1e-3, "cosine", 0.0),
    "cosine 1e-3 + distill 0.5": (1e-3, "cosine", 0.5),
}
#: Variants run on the original model too (the control).
CONTROLS = ("cosine 1e-3",)


def _accuracy(model, x, y) -> float:
    import numpy as np

    out = model.predict(x, batch_size=512, verbose=0)
    return float(np.mean(np.argmax(out, axis=1) == y))


def diagnose(
    model_path: str,
    workdir: str,
    *,
    dataset: str = "fashion_mnist",
    n_train: int | None = 10000,
    n_test: int | None = 10000,
    budget: float = 0.3,
    budget_kind: str = "macs",
    validation_fraction: float = 0.05,
    calibration_samples: int = 512,
    finetune_epochs: int = 2,
    seed: int = 0,
    allocations: tuple[str, ...] = ("greedy", "energy"),
    variants: tuple[str, ...] = tuple(VARIANTS),
    controls: tuple[str, ...] = CONTROLS,
    floor: bool = True,
    say=print,
) -> dict:
    """Run the three diagnoses (see the module docstring); returns the results."""
    import keras

    from compress.app import load_model, split_validation
    from compress.data_aware import local_rank_compress
    from compress.evaluate import ensure_compiled, finetune
    from compress.outputs import output_kind
    from compress.policies import GreedyParamFraction, ParamFraction
    from compress.surgery import recompile_like
    from compress.weight_only import weight_factorize
    from keras_localrank import datasets
    from keras_localrank.io import atomic_write_json, atomic_write_text
    from keras_localrank.validation import check_writable_dir

    check_writable_dir("workdir", workdir)
    model = load_model(model_path)
    kind = output_kind(model)
    ensure_compiled(model, kind=kind)
    ds = datasets.load(dataset, seed=seed, n_train=n_train, n_test=n_test)
    shape = (-1, *model.inputs[0].shape[1:])
    x, x_test, y, y_test = (
        ds.x_train.reshape(shape), ds.x_test.reshape(shape), ds.y_train, ds.y_test
    )
    n_fit = split_validation(len(x), validation_fraction)
    x_fit, y_fit, x_val, y_val = x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:]
    x_cal = x_fit[:calibration_samples]

    def val_loss(candidate):
        return kind.numpy_loss(y_val, candidate.predict(x_val, batch_size=512, verbose=0))

    out = {"model": model_path, "budget": budget, "budget_kind": budget_kind}
    out["original_accuracy"] = _accuracy(model, x_test, y_test)
    say(f"original: {out['original_accuracy']:.4f}")

    if not allocations:  # the control alone (e.g. a transformer, which has no convs)
        out["finetune"] = {}
        for name in controls:
            lr, schedule, _ = VARIANTS[name]
            student = keras.models.clone_model(model)
            student.set_weights(model.get_weights())
            recompile_like(student, model)
            done = finetune(
                student, x_fit, y_fit, epochs=finetune_epochs, seed=seed, learning_rate=lr,
                validation_data=(x_val, y_val), schedule=schedule,
            )
            acc = _accuracy(done.model, x_test, y_test)
            out["finetune"][f"original: {name}"] = {"accuracy": acc, "best_epoch": done.best_epoch}
            say(f"fine-tuned original ({name}): {acc:.4f} (epoch {done.best_epoch})")
        atomic_write_json(os.path.join(workdir, "diagnosis.json"), out)
        return out

    start = time.perf_counter()
    full = local_rank_compress(model, x_cal, ParamFraction(1.0), floor=False, cost=budget_kind)
    out["full_rank_rewrite_accuracy"] = _accuracy(full.model, x_test, y_test)
    say(f"full-rank rewrite: {out['full_rank_rewrite_accuracy']:.4f}")

    results = {}
    for allocation in allocations:
        policy = GreedyParamFraction(budget) if allocation == "greedy" else ParamFraction(budget)
        # With `evaluate`, the energy allocation also reports each layer's
        # share of the held-out loss (no greedy search).
        results[allocation] = local_rank_compress(
            model, x_cal, policy, evaluate=val_loss, cost=budget_kind, floor=floor
        )
        recompile_like(results[allocation].model, model)
    out["allocation"] = {
        name: {"accuracy": _accuracy(r.model, x_test, y_test), "ranks": r.ranks}
        for name, r in results.items()
    }
    chosen = results[allocations[0]]
    out["floors"] = chosen.floors
    out["layer_loss"] = dict(sorted(chosen.layer_loss.items(), key=lambda kv: -kv[1]))
    out["compress_seconds"] = time.perf_counter() - start
    say(f"allocation: {out['allocation']}")
    out["baselines"] = {}
    for scheme, method in (("channel", "weight_svd"), ("tucker2", "tucker2")):
        base = weight_factorize(model, ParamFraction(budget), scheme=scheme, cost=budget_kind)
        out["baselines"][method] = _accuracy(base.model, x_test, y_test)
    say(f"baselines before fine-tuning: {out['baselines']}")
    out["finetune"] = {}
    runs = [("compressed", chosen.model, v) for v in variants]
    runs += [("original", model, v) for v in controls]
    for which, source, name in runs:
        lr, schedule, distill = VARIANTS[name]
        student = keras.models.clone_model(source)
        student.set_weights(source.get_weights())
        recompile_like(student, model)
        done = finetune(
            student, x_fit, y_fit, epochs=finetune_epochs, seed=seed, learning_rate=lr,
            validation_data=(x_val, y_val), schedule=schedule, teacher=model,
            distill=distill,
        )
        acc = _accuracy(done.model, x_test, y_test)
        out["finetune"][f"{which}: {name}"] = {
            "accuracy": acc,
            "best_epoch": done.best_epoch,
            "validation": [list(s) for s in done.scores],
        }
        say(f"fine-tuned {which} ({name}): {acc:.4f} (epoch {done.best_epoch})")
        keras.backend.clear_session()

    lines = [
        f"# Diagnosis: {os.path.basename(model_path)} at {budget:g} of {budget_kind}",
        "",
        f"- original test accuracy: {out['original_accuracy']:.4f}",
        f"- full-rank rewrite (folded, constant channels removed): "
        f"{out['full_rank_rewrite_accuracy']:.4f}",
        "- before fine-tuning: "
        + ", ".join(f"{k} allocation {v['accuracy']:.4f}" for k, v in out["allocation"].items())
        + "; " + ", ".join(f"{k} {v:.4f}" for k, v in out["baselines"].items()),
        "",
        f"| layer | rank ({allocations[0]}) | floor | held-out loss rise, this layer alone |",
        "|---|---|---|---|",
    ]
    for layer, rise in out["layer_loss"].items():
        lines.append(
            f"| {layer} | {chosen.ranks.get(layer)} | {chosen.floors.get(layer, '-')} | "
            f"{rise:+.4f} |"
        )
    lines += ["", "| fine-tuning | test accuracy | epoch kept |", "|---|---|---|"]
    for name, row in out["finetune"].items():
        lines.append(f"| {name} | {row['accuracy']:.4f} | {row['best_epoch']} |")
    atomic_write_json(os.path.join(workdir, "diagnosis.json"), out)
    atomic_write_text(os.path.join(workdir, "diagnosis.md"), "\n".join(lines) + "\n")
    return out


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    diagnose(
        FLAGS.model,
        FLAGS.workdir,
        n_train=FLAGS.n_train,
        n_test=FLAGS.n_test,
        budget=FLAGS.budget,
        budget_kind=FLAGS.budget_kind,
        finetune_epochs=FLAGS.finetune_epochs,
        seed=FLAGS.seed,
        allocations=() if FLAGS.control_only else tuple(FLAGS.allocation),
        variants=tuple(FLAGS.variant),
        controls=() if FLAGS.skip_control else tuple(FLAGS.control),
        floor=FLAGS.floor,
        say=lambda line: print(line, flush=True),
    )


if __name__ == "__main__":
    flags.DEFINE_string("model", None, "Trained .keras model.", required=True)
    flags.DEFINE_string("workdir", None, "Output folder.", required=True)
    flags.DEFINE_integer("n_train", 10000, "Training samples.")
    flags.DEFINE_integer("n_test", 10000, "Test samples.")
    flags.DEFINE_float("budget", 0.3, "Budget fraction.")
    flags.DEFINE_enum("budget_kind", "macs", ["params", "macs"], "Budget unit.")
    flags.DEFINE_integer("finetune_epochs", 2, "Fine-tuning epochs.")
    flags.DEFINE_integer("seed", 0, "Seed.")
    flags.DEFINE_bool("skip_control", False, "Do not fine-tune the original.")
    flags.DEFINE_bool("floor", True, "Keep ranks at or above the local-rank floors.")
    flags.DEFINE_bool("control_only", False, "Only fine-tune the original (the control).")
    flags.DEFINE_multi_enum("allocation", ["greedy", "energy"], ["greedy", "energy"],
                            "Allocations compared (the first is fine-tuned).")
    flags.DEFINE_multi_enum("variant", list(VARIANTS), list(VARIANTS),
                            "Fine-tuning variants of the compressed model.")
    flags.DEFINE_multi_enum("control", list(CONTROLS), list(VARIANTS),
                            "Fine-tuning variants of the original (control).")
    common.run(main)
