"""Fine-tuning schedules, distillation from the original, and the one config builder."""

import dataclasses

import keras
import numpy as np
import pytest

from compress.app import CompressionConfig
from compress.distill import DistillationLoss, pack_targets
from compress.evaluate import finetune

L = keras.layers


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _reference(y, teacher, student, weight, temperature):
    """The distillation loss in float64 numpy, written out."""
    ce = -_log_softmax(student)[np.arange(len(y)), y]
    log_p = _log_softmax(teacher / temperature)
    log_q = _log_softmax(student / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
    return float(np.mean((1 - weight) * ce + weight * temperature**2 * kl))


@pytest.mark.parametrize("weight,temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 4.0)])
def test_distillation_loss_matches_numpy(weight, temperature):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 16)
    teacher = rng.normal(size=(16, 5)) * 3
    student = rng.normal(size=(16, 5)) * 3
    loss = DistillationLoss(weight, temperature)
    got = float(loss(pack_targets(y, teacher), student.astype("float32")))
    assert got == pytest.approx(_reference(y, teacher, student, weight, temperature), rel=1e-5)
    # Probabilities instead of logits: the same loss.
    probs = DistillationLoss(weight, temperature, from_logits=False)
    soft = lambda z: np.exp(_log_softmax(z))  # noqa: E731
    got_p = float(probs(pack_targets(y, soft(teacher)), soft(student).astype("float32")))
    assert got_p == pytest.approx(got, rel=1e-4)
    # A student equal to its teacher pays only the cross-entropy share.
    same = float(loss(pack_targets(y, teacher), teacher.astype("float32")))
    assert same == pytest.approx(_reference(y, teacher, teacher, weight, temperature), rel=1e-5)


def test_distillation_loss_validates_and_serializes():
    with pytest.raises(ValueError, match="weight"):
        DistillationLoss(1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(0.5, 0.0)
    with pytest.raises(ValueError, match="one teacher output per label"):
        pack_targets(np.zeros(3), np.zeros((2, 4)))
    loss = DistillationLoss(0.3, 3.0, from_logits=False)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert (again.weight, again.temperature, again.from_logits) == (0.3, 3.0, False)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16).astype("float32"), d.target


def _mlp(width, seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((64,)), L.Dense(width, activation="relu"), L.Dense(10)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def test_cosine_schedule_decays_to_zero_and_distillation_restores_the_compile_config():
    x, y = _digits()
    teacher = _mlp(32, 0)
    teacher.fit(x[:1000], y[:1000], epochs=5, batch_size=64, verbose=0)
    student = _mlp(8, 1)
    done = finetune(
        student, x[:1000], y[:1000], epochs=2, batch_size=100, learning_rate=1e-2,
        validation_data=(x[1000:1300], y[1000:1300]), schedule="cosine",
        teacher=teacher, distill=0.5,
    )
    assert done.learning_rate == 1e-2 and len(done.scores) == 3
    # The model is compiled back with its own loss and metrics (it saves and
    # evaluates as before), and its kept weights score what was recorded.
    assert isinstance(student.loss, keras.losses.SparseCategoricalCrossentropy)
    result = student.evaluate(x[1000:1300], y[1000:1300], verbose=0, return_dict=True)
    assert result["accuracy"] == pytest.approx(done.scores[done.best_epoch][0], abs=1e-6)
    assert done.scores[done.best_epoch] >= done.scores[0]
    # Distillation moved the student towards the teacher (it learned).
    assert done.scores[-1][0] > done.scores[0][0] + 0.1


def test_cosine_schedule_reaches_zero_learning_rate():
    x, y = _digits()
    model = _mlp(8, 2)
    finetune(model, x[:500], y[:500], epochs=2, batch_size=100, learning_rate=1e-2,
             schedule="cosine")
    # 10 steps of a cosine from 1e-2: the rate at the last step is 0.
    lr = model.optimizer.learning_rate
    assert int(model.optimizer.iterations.numpy()) == 10
    assert float(np.asarray(lr)) == pytest.approx(0.0, abs=1e-9)


def test_finetune_rejects_bad_schedule_and_distillation():
    x, y = _digits()
    model = _mlp(8, 3)
    with pytest.raises(ValueError, match="schedule"):
        finetune(model, x[:50], y[:50], epochs=1, schedule="linear")
    with pytest.raises(ValueError, match="teacher"):
        finetune(model, x[:50], y[:50], epochs=1, distill=0.5)
    with pytest.raises(ValueError, match="distill"):
        finetune(model, x[:50], y[:50], epochs=1, distill=2.0, teacher=model)


@dataclasses.dataclass
class _Study:
    budgets: tuple = (0.4, 0.2)
    methods: tuple = ("local_rank",)
    distill: float = 0.5
    epochs: int = 7  # not a CompressionConfig field: ignored


def test_one_config_builder_from_a_dataclass_a_mapping_and_flags():
    from absl import flags

    config = CompressionConfig.from_mapping(_Study(), model="m.keras", dataset="digits",
                                            workdir="w")
    assert config.budgets == (0.4, 0.2) and config.methods == ("local_rank",)
    assert config.distill == 0.5 and config.finetune_schedule == "constant"
    mapped = CompressionConfig.from_mapping(
        {"model": "m.keras", "dataset": "digits", "workdir": "w", "budgets": [0.3]}
    )
    assert mapped.budgets == (0.3,)
    values = flags.FlagValues()
    flags.DEFINE_multi_float("budget", [0.2], "", flag_values=values)
    flags.DEFINE_string("model", "a.keras", "", flag_values=values)
    flags.DEFINE_string("dataset", "mnist", "", flag_values=values)
    flags.DEFINE_string("workdir", "w", "", flag_values=values)
    flags.DEFINE_enum("finetune_schedule", "cosine", ["constant", "cosine"], "",
                      flag_values=values)
    values(["prog", "--budget=0.5", "--budget=0.1"])
    from_flags = CompressionConfig.from_mapping(values)
    assert from_flags.budgets == (0.5, 0.1) and from_flags.finetune_schedule == "cosine"
    assert from_flags.model == "a.keras"
    with pytest.raises(TypeError, match="unknown"):
        CompressionConfig.from_mapping({}, model="m", dataset="digits", workdir="w", nope=1)
    with pytest.raises(TypeError, match="mapping, a dataclass"):
        CompressionConfig.from_mapping(3)
