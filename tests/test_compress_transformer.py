"""Tests of the transformer rewrites: low-rank projections and constant heads.

References are independent of the code under test: the original model's
outputs (a rewrite must compute the same function), a NumPy forward pass of
multi-head attention, `numpy.linalg.matrix_rank`, kernels and data of known
rank by construction, and bias folds worked out by hand.
"""

import os

import keras
import numpy as np
import pytest

from compress.attention_layers import LowRankEinsumDense, LowRankMultiHeadAttention
from compress.layers import LowRankDense
from compress.policies import ParamFraction
from compress.transformer import (
    UnsupportedLayerError,
    compress_attention,
    constant_heads,
    projection_candidates,
    projection_statistics,
    prune_constant_heads,
    skipped_layers,
    transformer_compress,
    transformer_targets,
    weight_svd_projections,
)

T, D = 5, 8  # sequence length, model width
ALL = ("query", "key", "value", "attention_output")


def _block(*, heads=2, key_dim=4, value_dim=None, use_bias=True, seed=0):
    """Attention + LayerNorm + Dense/EinsumDense feed-forward, with random non-zero biases."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((T, D))
    mha = keras.layers.MultiHeadAttention(
        heads, key_dim, value_dim=value_dim, use_bias=use_bias, name="mha"
    )
    h = keras.layers.Add()([inp, mha(inp, inp)])
    h = keras.layers.LayerNormalization(name="ln")(h)
    f = keras.layers.Dense(12, activation="relu", name="ffn1")(h)
    f = keras.layers.EinsumDense("abc,cd->abd", (None, D), bias_axes="d", name="ffn2")(f)
    out = keras.layers.Add()([h, f])
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if "bias" in w.path:
            w.assign(rng.normal(size=w.shape).astype("float32") * 0.3)
    return model


def _x(n=48, seed=1):
    return np.random.default_rng(seed).normal(size=(n, T, D)).astype("float32")


def _predict(model, x):
    return np.asarray(model(x, training=False))


def _np_attention(layer, x):
    """NumPy float64 self-attention of a stock `MultiHeadAttention` on `x` [B, T, D].

    Returns `(per-head outputs [B, T, N, Hv], layer output [B, T, D])`.
    """
    w = {k: np.asarray(v, dtype=np.float64) for k, v in _named(layer).items()}
    q = np.einsum("btd,dnh->btnh", x, w["query/kernel"]) + w.get("query/bias", 0)
    k = np.einsum("btd,dnh->btnh", x, w["key/kernel"]) + w.get("key/bias", 0)
    v = np.einsum("btd,dnh->btnh", x, w["value/kernel"]) + w.get("value/bias", 0)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    heads = np.einsum("bnts,bsnh->btnh", scores, v)
    out = np.einsum("btnh,nhe->bte", heads, w["attention_output/kernel"])
    return heads, out + w.get("attention_output/bias", 0)


def _named(layer):
    return {"/".join(v.path.split("/")[-2:]): v.numpy() for v in layer.weights}


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- the NumPy reference itself, and the statistics ----------------------------------


def test_statistics_match_numpy_attention():
    model = _block(heads=3, key_dim=2, value_dim=3)
    x = _x()
    layer = model.get_layer("mha")
    heads, out = _np_attention(layer, x.astype(np.float64))
    sub = keras.Model(model.inputs[0], layer.output)
    assert _max_err(_predict(sub, x), out) < 1e-4  # the reference is MHA
    stats = projection_statistics(model, x, ["mha/attention_output", "mha/value"], batch_size=7)
    rows = out.reshape(-1, D)
    st = stats["mha/attention_output"]
    assert (st.n_in, st.n_out, st.count) == (9, D, len(x) * T)
    np.testing.assert_allclose(st.mean, rows.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(st.covariance, np.cov(rows, rowvar=False, bias=True), atol=1e-4)
    w = _named(layer)
    v_rows = x.reshape(-1, D) @ w["value/kernel"].reshape(D, -1) + w["value/bias"].reshape(-1)
    np.testing.assert_allclose(stats["mha/value"].mean, v_rows.mean(axis=0), atol=1e-5)
    cands = projection_candidates(stats)
    assert [c.name for c in cands] == ["mha/attention_output", "mha/value"]
    expected = np.sort(np.linalg.eigvalsh(np.cov(rows, rowvar=False, bias=True)))[::-1]
    np.testing.assert_allclose(cands[0].spectrum, expected, atol=1e-4)
    del heads


def test_targets_list_projections_in_model_order():
    model = _block()
    assert transformer_targets(model) == [f"mha/{p}" for p in ALL] + ["ffn1", "ffn2"]


# --- exact at full rank ------------------------------------------------------------------


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("method", ["data_aware", "weight_svd"])
def test_full_rank_rewrites_are_exact(use_bias, method):
    model = _block(heads=2, key_dim=3, value_dim=5, use_bias=use_bias)
    x = _x()
    reference = _predict(model, x)
    ranks = {"mha/query": 6, "mha/key": 6, "mha/value": D, "mha/attention_output": D}
    ranks.update({"ffn1": D, "ffn2": D})
    if method == "data_aware":
        new, records = compress_attention(model, x, ranks)
    else:
        new, records = weight_svd_projections(model, ranks)
    mha = new.get_layer("mha")
    assert isinstance(mha, LowRankMultiHeadAttention)
    assert mha.projection_ranks == {p: ranks[f"mha/{p}"] for p in ALL}
    subs = ("_query_dense", "_key_dense", "_value_dense", "_output_dense")
    assert all(isinstance(getattr(mha, a), LowRankEinsumDense) for a in subs)
    assert isinstance(new.get_layer("ffn1"), LowRankDense)
    assert isinstance(new.get_layer("ffn2"), LowRankEinsumDense)
    assert {r.target: r.rank for r in records} == ranks
    assert all(abs(r.energy - 1.0) < 1e-9 for r in records)
    assert _max_err(_predict(new, x), reference) < 1e-4 * max(1.0, np.abs(reference).max())
    assert len(new.weights) == len(model.weights) + 6  # one extra factor per projection
    assert _max_err(_predict(model, x), reference) == 0  # the input model is untouched
    assert not isinstance(model.get_layer("mha"), LowRankMultiHeadAttention)


def test_causal_cross_attention_statistics_and_rewrites_follow_the_layer():
    """Distinct key and value inputs and a causal mask: the statistics are those
    of the layer's actual outputs, and the rewrites stay exact."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((T, D))
    k = keras.layers.Dense(D, name="k_in")(inp)
    v = keras.layers.Dense(D, activation="tanh", name="v_in")(inp)
    mha = keras.layers.MultiHeadAttention(3, 2, value_dim=4, name="mha")
    out = mha(inp, v, key=k, use_causal_mask=True)
    model = keras.Model(inp, keras.layers.Dense(4, name="head")(out))
    x = _x()
    actual = _predict(keras.Model(inp, out), x).reshape(-1, D)
    stats = projection_statistics(model, x, ["mha/attention_output"])
    np.testing.assert_allclose(stats["mha/attention_output"].mean, actual.mean(axis=0), atol=1e-5)
    cov = np.cov(actual.astype(np.float64), rowvar=False, bias=True)
    np.testing.assert_allclose(stats["mha/attention_output"].covariance, cov, atol=1e-5)
    reference = _predict(model, x)
    full, _ = compress_attention(model, x, {"mha/query": 6, "mha/attention_output": D})
    assert _max_err(_predict(full, x), reference) < 1e-4
    vk = model.get_layer("mha").value_dense.kernel
    kernel = vk.numpy()
    kernel[:, 1] = 0.0
    vk.assign(kernel)
    reference = _predict(model, x)
    pruned, records = prune_constant_heads(model, x, 1e-5)
    assert records[0].removed == (1,)
    assert _max_err(_predict(pruned, x), reference) < 1e-4


# --- known rank: lossless at the rank, lossy below -----------------------------------------


def _plant_rank(model, target_kernel, rank, rng):
    """Overwrite a kernel by a random one of rank `rank`, same shape."""
    shape = target_kernel.shape
    flat = rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, int(np.prod(shape[1:]))))
    target_kernel.assign((flat / np.sqrt(shape[0])).reshape(shape).astype("float32"))


def test_planted_low_rank_projections_compress_without_loss():
    model = _block(heads=2, key_dim=4)
    rng = np.random.default_rng(3)
    mha = model.get_layer("mha")
    _plant_rank(model, mha.value_dense.kernel, 2, rng)
    _plant_rank(model, mha.query_dense.kernel, 3, rng)
    _plant_rank(model, model.get_layer("ffn2").kernel, 3, rng)
    x = _x()
    reference = _predict(model, x)
    ranks = {"mha/value": 2, "mha/query": 3, "ffn2": 3}
    new, _ = compress_attention(model, x, ranks)
    assert _max_err(_predict(new, x), reference) < 1e-4
    for target, attr in (("mha/value", "_value_dense"), ("mha/query", "_query_dense")):
        sub = getattr(new.get_layer("mha"), attr)
        a, b = sub.kernel_a.numpy(), sub.kernel_b.numpy()
        assert (
            np.linalg.matrix_rank(a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1))
            == (ranks[target])
        )
    # One rank below the planted rank loses information: the test can fail.
    lossy, _ = compress_attention(model, x, {"mha/value": 1})
    assert _max_err(_predict(lossy, x), reference) > 1e-2


def test_data_aware_uses_the_data_subspace_where_weight_svd_cannot():
    """Inputs vary in 3 directions around an offset outside them: a full-rank
    query kernel has outputs of covariance rank 3, and a mean the data-aware
    bias must carry."""
    model = _block(heads=2, key_dim=4)
    q = np.linalg.qr(np.random.default_rng(5).normal(size=(D, 4)))[0]
    basis, offset = q[:, :3], 2.0 * q[:, 3]
    x = np.random.default_rng(6).normal(size=(64, T, 3)) @ basis.T + offset
    x = x.astype("float32")
    reference = _predict(model, x)
    k = model.get_layer("mha").query_dense.kernel.numpy().reshape(D, -1)
    assert np.linalg.matrix_rank(k) == D  # the weights alone are full rank
    data_aware, _ = compress_attention(model, x, {"mha/query": 3, "mha/key": 3, "mha/value": 3})
    svd, _ = weight_svd_projections(model, {"mha/query": 3, "mha/key": 3, "mha/value": 3})
    assert _max_err(_predict(data_aware, x), reference) < 1e-4
    assert _max_err(_predict(svd, x), reference) > 1e-2


# --- constant heads -------------------------------------------------------------------------


def _zero_value_head(model, head):
    v = model.get_layer("mha").value_dense.kernel
    kernel = v.numpy()
    kernel[:, head, :] = 0.0
    v.assign(kernel)


def test_constant_head_removal_is_exact_and_folds_the_bias():
    model = _block(heads=3, key_dim=4)
    _zero_value_head(model, 1)  # head 1 outputs its value bias, whatever the input
    x = _x()
    reference = _predict(model, x)
    found = constant_heads(model, x, atol=1e-5)
    w = _named(model.get_layer("mha"))
    assert sorted(found["mha"]) == [1]
    np.testing.assert_allclose(found["mha"][1], w["value/bias"][1], atol=1e-5)
    new, records = prune_constant_heads(model, x, 1e-5)
    assert records[0].removed == (1,) and (records[0].num_heads, records[0].kept) == (3, 2)
    mha = new.get_layer("mha")
    assert mha.num_heads == 2 and type(mha) is keras.layers.MultiHeadAttention
    assert _max_err(_predict(new, x), reference) < 1e-4
    # The fold, by hand: b_out + b_v[1] @ W_out[1].
    folded = w["attention_output/bias"] + w["value/bias"][1] @ w["attention_output/kernel"][1]
    np.testing.assert_allclose(_named(mha)["attention_output/bias"], folded, atol=1e-5)
    keep = [0, 2]
    np.testing.assert_array_equal(_named(mha)["query/kernel"], w["query/kernel"][:, keep])


def test_constant_head_removal_after_low_rank_projections():
    model = _block(heads=3, key_dim=4)
    _zero_value_head(model, 0)
    x = _x()
    reference = _predict(model, x)
    low, _ = compress_attention(model, x, {f"mha/{p}": D for p in ALL})
    new, records = prune_constant_heads(low, x, 1e-5)
    assert records[0].removed == (0,)
    assert isinstance(new.get_layer("mha"), LowRankMultiHeadAttention)
    assert new.get_layer("mha").num_heads == 2
    assert _max_err(_predict(new, x), reference) < 1e-4


def test_no_constant_head_returns_the_input_model():
    model = _block(heads=2)
    new, records = prune_constant_heads(model, _x(), 1e-6)
    assert new is model and records[0].removed == ()


def test_constant_heads_without_output_bias():
    # Zero-bias MHA whose value input is a non-zero constant: every head is
    # constant, one is kept, and the others cannot be folded without a bias.
    keras.utils.set_random_seed(0)
    inp = keras.Input((T, D))
    const = keras.layers.Dense(D, kernel_initializer="zeros", bias_initializer="ones")(inp)
    out = keras.layers.MultiHeadAttention(2, 4, use_bias=False, name="mha")(inp, const)
    model = keras.Model(inp, out)
    assert sorted(constant_heads(model, _x(), atol=1e-5)["mha"]) == [0, 1]
    with pytest.raises(ValueError, match="no bias to absorb"):
        prune_constant_heads(model, _x(), 1e-5)
    # A zero head needs no bias: zero value kernel, no biases.
    model = _block(heads=2, use_bias=False)
    _zero_value_head(model, 0)
    x = _x()
    new, records = prune_constant_heads(model, x, 1e-6)
    assert records[0].removed == (0,)
    assert _max_err(_predict(new, x), _predict(model, x)) < 1e-5


# --- serialization -----------------------------------------------------------------------------


def test_rewritten_models_round_trip_through_keras_files(tmp_path):
    model = _block(heads=3, key_dim=4, value_dim=2)
    _zero_value_head(model, 2)
    x = _x()
    low, _ = compress_attention(model, x, {"mha/query": 3, "mha/attention_output": 4, "ffn2": 5})
    new, _ = prune_constant_heads(low, x, 1e-5)
    expected = _predict(new, x)
    path = os.path.join(tmp_path, "m.keras")
    new.save(path)
    loaded = keras.models.load_model(path)
    mha = loaded.get_layer("mha")
    assert isinstance(mha, LowRankMultiHeadAttention) and mha.num_heads == 2
    assert mha.projection_ranks == {"query": 3, "attention_output": 4}
    assert isinstance(loaded.get_layer("ffn2"), LowRankEinsumDense)
    assert _max_err(_predict(loaded, x), expected) < 1e-6
    assert sum(int(np.prod(w.shape)) for w in loaded.weights) == sum(
        int(np.prod(w.shape)) for w in new.weights
    )
    # The factors train: one step moves every weight of the loaded attention
    # but the key bias (softmax is blind to a shift shared by all keys).
    weights = loaded.get_layer("mha").trainable_weights
    assert len(weights) == len(loaded.get_layer("mha").weights) == 10
    before = {w.path: w.numpy().copy() for w in weights}
    loaded.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    loaded.fit(x, np.zeros_like(expected), epochs=1, batch_size=len(x), verbose=0)
    moved = {w.path for w in weights if np.any(before[w.path] != w.numpy())}
    assert set(before) - moved == {"mha/key/bias"}, set(before) - moved


def test_low_rank_einsum_dense_matches_numpy_and_validates():
    layer = LowRankEinsumDense(output_dims=(3, 2), rank=2, contract_dims=2, activation="tanh")
    x = np.random.default_rng(0).normal(size=(4, 5, 6, 7)).astype("float32")
    y = np.asarray(layer(x))
    a, b, bias = (w.numpy().astype(np.float64) for w in layer.weights)
    ref = np.tanh(np.einsum("bthw,hwr,rij->btij", x, a, b) + bias)
    np.testing.assert_allclose(y, ref, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        LowRankEinsumDense(output_dims=(3,), rank=0)
    with pytest.raises(TypeError, match="output_dims"):
        LowRankEinsumDense(output_dims="x", rank=1)
    with pytest.raises(ValueError, match="projection_ranks"):
        LowRankMultiHeadAttention(2, 4, projection_ranks={"gate": 1})


# --- errors ---------------------------------------------------------------------------------------


def test_clear_errors_for_what_cannot_be_rewritten():
    model = _block()
    x = _x()
    with pytest.raises(ValueError, match="Unknown layer 'nope'"):
        compress_attention(model, x, {"nope": 1})
    with pytest.raises(ValueError, match="projection in"):
        compress_attention(model, x, {"mha/gate": 1})
    with pytest.raises(ValueError, match=r"ranks\['ffn1'\] <= 8"):
        compress_attention(model, x, {"ffn1": 9})
    with pytest.raises(ValueError, match="positive int"):
        compress_attention(model, x, {"ffn1": 0})
    with pytest.raises(TypeError, match="int"):
        compress_attention(model, x, {"ffn1": 2.0})
    with pytest.raises(UnsupportedLayerError, match="'ln' of type LayerNormalization"):
        compress_attention(model, x, {"ln": 2})
    with pytest.raises(ValueError, match="atol"):
        prune_constant_heads(model, x, -1.0)

    inp = keras.Input((T, D))
    h = keras.layers.EinsumDense("abc,bd->acd", (D, 4), name="mix")(inp)  # contracts time
    gated = keras.layers.MultiHeadAttention(2, 4, use_gate=True, name="gated")(inp, inp)
    shared = keras.layers.Dense(D, name="shared")
    out = keras.layers.Concatenate()([shared(gated), shared(inp)])
    odd = keras.Model(inp, [h, out])
    with pytest.raises(UnsupportedLayerError, match="'mix'.*not a projection of trailing axes"):
        compress_attention(odd, x, {"mix": 1})
    with pytest.raises(UnsupportedLayerError, match="use_gate"):
        compress_attention(odd, x, {"gated/query": 1})
    with pytest.raises(UnsupportedLayerError, match="use_gate"):
        prune_constant_heads(odd, x, 0.0)
    assert transformer_targets(odd) == []
    skipped = skipped_layers(odd)
    assert set(skipped) == {"mix", "gated", "shared"}
    assert "use_gate" in skipped["gated"] and "called 2 times" in skipped["shared"]
    with pytest.raises(UnsupportedLayerError, match="called 2 times"):
        compress_attention(odd, x, {"shared": 2})


def test_candidates_feed_the_rank_policies():
    model = _block()
    x = _x()
    stats = projection_statistics(model, x)
    cands = projection_candidates(stats, floors={"ffn1": 3})
    assert {c.name: (c.n_in, c.n_out) for c in cands}["ffn1"] == (D, 12)
    assert {c.name: c.floor for c in cands}["ffn1"] == 3
    total = sum(int(np.prod(w.shape)) for w in model.weights)
    fixed = total - sum(c.dense_params for c in cands)
    ranks = ParamFraction(0.6).select(cands, fixed_params=fixed, original_params=total)
    chosen = {t: r for t, r in ranks.items() if next(c for c in cands if c.name == t).saves(r)}
    new, records = compress_attention(model, x, chosen, statistics=stats)
    after = sum(int(np.prod(w.shape)) for w in new.weights)
    assert after == total - sum(r.params_before - r.params_after for r in records)
    assert after <= 0.6 * total + 1


# --- at a budget ------------------------------------------------------------------


def test_transformer_compress_meets_a_parameter_budget_after_removing_heads():
    model = _block(heads=3, key_dim=4)
    _zero_value_head(model, 2)
    x = _x()
    total = sum(int(np.prod(w.shape)) for w in model.weights)
    out = transformer_compress(model, x, 0.7, head_tol=1e-5)
    assert out.removed_units == {"mha": 1}
    assert out.model.get_layer("mha").num_heads == 2
    assert out.ranks  # something was factorized
    assert sum(int(np.prod(w.shape)) for w in out.model.weights) <= 0.7 * total
    assert out.model is not model and model.get_layer("mha").num_heads == 3
    # At the full budget nothing is factorized, and the function is the same.
    full = transformer_compress(model, x, 1.0, head_tol=1e-5)
    assert full.ranks == {}
    assert _max_err(_predict(full.model, x), _predict(model, x)) < 1e-4


def test_projection_weight_svd_baseline_at_a_budget():
    from compress.baselines import projection_weight_svd
    from compress.transformer import weight_candidates

    model = _block()
    total = sum(int(np.prod(w.shape)) for w in model.weights)
    out = projection_weight_svd(model, 0.7)
    assert out.method == "weight_svd" and out.ranks
    assert sum(int(np.prod(w.shape)) for w in out.model.weights) <= 0.7 * total
    cands = {c.name: c for c in weight_candidates(model)}
    kernel = model.get_layer("mha").value_dense.kernel.numpy().reshape(D, -1)
    expected = np.linalg.svd(kernel.astype(np.float64), compute_uv=False) ** 2
    np.testing.assert_allclose(cands["mha/value"].spectrum, expected, rtol=1e-6)
    assert (cands["mha/attention_output"].n_in, cands["mha/attention_output"].n_out) == (8, D)
    with pytest.raises(ValueError, match="no projection"):
        projection_weight_svd(keras.Sequential([keras.Input((3,)), keras.layers.ReLU()]), 0.5)


def test_transformer_compress_meets_a_macs_budget_greedily_on_exact_stand_ins():
    from compress.macs import count_macs
    from compress.policies import GreedyParamFraction, InfeasibleBudgetError
    from compress.transformer import _stand_in_trial

    model = _block()
    x = _x()
    target = model.predict(x, verbose=0)

    def score(m):  # a held-out "loss": distance to the original's outputs
        return float(np.mean((m.predict(x, verbose=0) - target) ** 2))

    out = transformer_compress(model, x, GreedyParamFraction(0.7), evaluate=score, cost="macs")
    assert out.budget_kind == "macs" and out.ranks
    # The budget is met as the MAC counter counts the rewritten model
    # (attention scores included: they are part of what cannot shrink).
    assert count_macs(out.model) <= 0.7 * count_macs(model)
    # The greedy trials ran on a stand-in holding the product of the factors:
    # the same function as the rewritten model.
    from compress.projections import projection_statistics

    stats = projection_statistics(model, x, transformer_targets(model), batch_size=64)
    trial = _stand_in_trial(model, stats, lambda ranks: dict(ranks), score)
    assert trial(out.ranks) == pytest.approx(score(out.model), rel=1e-4, abs=1e-7)
    # Each rewritten projection's own share of the loss is reported.
    assert set(out.layer_loss) == set(out.ranks)
    assert all(v >= -1e-6 for v in out.layer_loss.values())
    # A MACs budget below what the attention scores alone need is refused.
    with pytest.raises(InfeasibleBudgetError, match="Impossible budget"):
        transformer_compress(model, x, 0.01, cost="macs")


def test_projection_weight_svd_meets_a_macs_budget():
    from compress.baselines import projection_weight_svd
    from compress.macs import count_macs

    model = _block()
    out = projection_weight_svd(model, 0.7, cost="macs")
    assert out.ranks and out.budget_kind == "macs"
    assert count_macs(out.model) <= 0.7 * count_macs(model)


def test_projection_floors_of_feed_forward_layers_know_a_planted_rank():
    from compress.transformer import projection_floors

    keras.utils.set_random_seed(0)
    inp = keras.Input((T, D))
    h = keras.layers.Dense(2, name="bottleneck")(inp)  # rank 2 at every token
    h = keras.layers.Dense(6, activation="tanh", name="ffn")(h)
    a = keras.layers.MultiHeadAttention(2, 3, name="mha")(h, h)
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Add()([h, a]))
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
    floors, unmeasured = projection_floors(model, _x(n=16), rtol=1e-3)
    # Each token's pre-activation of `ffn` sees that token's input through a
    # width-2 layer: its Jacobian has rank 2 exactly (numpy's rank of
    # W_ffn^T W_bottleneck^T is the reference).
    kernels = [model.get_layer(n).kernel.numpy().astype(np.float64) for n in ("bottleneck", "ffn")]
    assert floors["ffn"] == np.linalg.matrix_rank(kernels[0] @ kernels[1]) == 2
    assert floors["bottleneck"] == 2
    assert 1 <= floors["head"] <= 3
    assert set(unmeasured) == {f"mha/{p}" for p in ALL}
    # The floors bound the ranks the policy may choose.
    out = transformer_compress(model, _x(n=16), 0.9, floors=floors)
    assert all(out.ranks.get(t, floors[t]) >= floors[t] for t in floors)
    assert out.floors == floors
