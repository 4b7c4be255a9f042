"""Memory budgeting of a measurement: samples per chunk and directions in flight.

The peak of a matrix-free measurement is dominated by two terms:

- *activations*: forward mode pushes `B * d` replicas (`B` samples, `d`
  directions each) through the whole network, holding primal and tangent
  values of every layer output; reverse mode holds the tape of `B * d`
  replicas. Both are estimated as `3 * itemsize * sum(layer output sizes)`
  bytes per replica, from the model's own layer output shapes (nested models
  and attention projections included, and the attention scores);
- *results*: per sample, either a float64 Gram in the smaller dimension, or
  the reduced Jacobian (when it must be assembled) plus its Gram.

`plan_sizes` picks `B` and `d` so that their sum stays within the budget.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math

import keras

from keras_localrank.graph import functional_graph, layer_calls
from keras_localrank.validation import check_int

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "REPLICA_SHARE",
    "activation_elements",
    "attention_score_elements",
    "check_memory_budget",
    "colored_storage_bytes",
    "exact_storage_bytes",
    "pack_by_storage",
    "plan_sizes",
    "release_free_heap",
]

#: Default bound on the peak memory growth of one measurement (bytes).
DEFAULT_MEMORY_BUDGET = 2 * 2**30
#: Replica cost factor: primal + tangent (or tape) + temporaries.
ACTIVATION_FACTOR = 3
#: Directions in flight a chunk keeps room for before it takes more samples
#: (`plan_sizes`). Fewer directions per pass mean more passes per sample,
#: each a rank-`d` update of every float64 Gram of the pack (memory-bound at
#: small `d`). MobileNetV2 at 32x32, all layers, before the Grams moved to
#: the host: chunks of 2 samples with 44 directions grew by 2,927 MiB against
#: a 2,048 MiB plan; one sample with 240 directions by 2,131 MiB, in the
#: same time. (Forward packs still leave room for 32 directions only.)
MIN_DIRECTIONS = 256
#: Share of the budget the replicas of one exact pass may take, at most.
#: Wider passes buy little, and a replica costs more than planned on
#: convnets (oneDNN's blocked-layout copies): MobileNetV2 at 32x32, one
#: input, grew by 2,071 MiB at 270 directions per pass (planned replicas
#: 1,404 MiB) and by 1,688 MiB at 180, in 21.8 and 20.7 s.
REPLICA_SHARE = 0.5
#: Values of one column chunk of an assembled Jacobian cast to float64 while
#: its Gram is formed (`matfree._finish`; 64 MiB): the matrix itself is never
#: copied in float64.
GRAM_CHUNK_VALUES = 2**23


def check_memory_budget(value) -> int:
    """`memory_budget` in bytes: a positive int (a budget too small for one
    sample is reported by the planner, which knows the model).

    Raises:
        TypeError: not an int.
        ValueError: below 1.
    """
    return check_int("memory_budget", value, minimum=1)


def activation_elements(model, input_shape=None) -> int:
    """Values per sample of all layer outputs of `model` (nested models included).

    Args:
        model: a functional or Sequential model.
        input_shape: per-sample shape of the first input, for a model built
            with undefined (None) dimensions (see `graph.layer_calls`).
            Dimensions still undefined count as 1; the input itself is
            counted once.
    """
    inputs = functional_graph(model).inputs
    shapes = [tuple(t.shape[1:]) for t in inputs]
    if input_shape is not None:
        shapes[0] = tuple(input_shape)
    total = sum(math.prod(d or 1 for d in shape) for shape in shapes)
    calls = layer_calls(model, input_shape=input_shape)
    for call in calls:
        total += sum(math.prod(d or 1 for d in shape) for shape in call.output_shapes)
        if call.part_of is None and isinstance(call.layer, keras.layers.MultiHeadAttention):
            parts = {c.layer.name: c for c in calls if c.part_of == call.name}
            query = getattr(call.layer, "_query_dense", None)
            key = getattr(call.layer, "_key_dense", None)
            if query is not None and key is not None and {query.name, key.name} <= set(parts):
                total += attention_score_elements(
                    call.layer, parts[query.name].input_shape, parts[key.name].input_shape
                )
    return total


def attention_score_elements(layer, query_shape, key_shape) -> int:
    """Values per sample of a `MultiHeadAttention` call's attention scores
    and their softmax (`2 * heads * T_q * T_k` for sequences; over the
    layer's attention axes in general, the other axes acting as batch axes).

    The projections are counted as layer calls of their own; the scores are
    not, and on short sequences they are as large as all the projections
    together: a block on (16, 32) with 4 heads of 8 grew by 0.10 MiB per
    replica in forward mode against 0.053 MiB planned without them and the
    projections (0.0996 MiB with both counted).

    Args:
        layer: the built `MultiHeadAttention` layer.
        query_shape: per-sample shape of the query (features last).
        key_shape: per-sample shape of the key.
    """
    q = [d or 1 for d in query_shape[:-1]]
    k = [d or 1 for d in key_shape[:-1]]
    axes = layer.attention_axes
    # Axes count the batch axis (0) of the projected (batch, ..., heads, dim).
    attended = set(range(len(q))) if axes is None else {a - 1 for a in axes}
    batch_like = math.prod(d for i, d in enumerate(q) if i not in attended)
    t_q = math.prod(d for i, d in enumerate(q) if i in attended)
    t_k = math.prod(d for i, d in enumerate(k) if i in attended)
    return 2 * layer.num_heads * batch_like * t_q * t_k


def exact_storage_bytes(units: int, directions: int, itemsize: int, *, accumulate: bool) -> int:
    """Per-sample bytes kept by the exact path for one layer.

    Args:
        units: `n_l`.
        directions: `k`, the width of the reduced Jacobian.
        itemsize: bytes of one value of the compute dtype.
        accumulate: True when the Gram is accumulated block by block (the
            products arrive along the larger dimension); False when the
            reduced Jacobian is assembled first (the stored blocks and their
            stacked copy; the float64 Gram is then formed one column chunk at
            a time, at most `GRAM_CHUNK_VALUES` float64 values and their
            transposed copy).
    """
    small = min(units, directions)
    gram = 8 * small * small
    if accumulate:
        return gram
    chunk = 2 * 8 * min(units * directions, GRAM_CHUNK_VALUES)
    return 2 * itemsize * units * directions + chunk + gram


def colored_storage_bytes(
    *, units: int, input_dim: int, num_colors: int, local_gram_bytes: int, itemsize: int
) -> int:
    """Per-sample bytes kept by the colored path for one layer.

    The colour products (`num_colors x n_l`, stored blocks, their stack and a
    float64 copy), one block of float64 local Grams (and its transpose), and
    the `n0 x n0` float64 Gram (accumulator, update, and the
    eigen-decomposition's copy).

    Args:
        units: `n_l`.
        input_dim: `n0`.
        num_colors: colours pushed (products per sample).
        local_gram_bytes: bytes of one block of local Grams.
        itemsize: bytes of one value of the compute dtype.
    """
    products = num_colors * units * (2 * itemsize + 8)
    return products + 2 * local_gram_bytes + 3 * 8 * input_dim * input_dim


def plan_sizes(
    *,
    budget: int,
    per_sample: int,
    per_replica: int,
    max_directions: int,
    batch_size: int | None,
    max_batch: int = 128,
    min_directions: int = MIN_DIRECTIONS,
) -> tuple[int, int] | None:
    """Samples per chunk `B` and directions in flight `d` within `budget`.

    `B * (per_sample + d * per_replica) <= budget`. `B` is the given
    `batch_size`, else the largest (up to `max_batch`) that leaves room for
    `min(max_directions, min_directions)` directions; `d` then takes what is
    left (at most `max_directions`).

    Returns:
        `(B, d)`, or None when not even one sample with one direction fits.
    """
    per_replica = max(per_replica, 1)
    want = min(max_directions, min_directions)
    if batch_size is None:
        unit = per_sample + want * per_replica
        batch = max(1, min(max_batch, budget // max(unit, 1)))
    else:
        batch = batch_size
    room = budget // batch - per_sample
    directions = min(max_directions, room // per_replica)
    if directions < 1:
        return None
    return int(batch), int(directions)


def pack_by_storage(items, size, room: int) -> list[list]:
    """Consecutive packs of `items` whose `size` sums stay within `room`.

    Items are kept in order; an item larger than `room` gets a pack of its
    own (the planner then reports whether one such pack fits at all).

    Args:
        items: sequence of items.
        size: `item -> int` bytes.
        room: bytes one pack may hold.

    Returns:
        A list of non-empty lists covering `items` in order.
    """
    packs: list[list] = []
    total = 0
    for item in items:
        cost = size(item)
        if packs and total + cost <= room:
            packs[-1].append(item)
            total += cost
        else:
            packs.append([item])
            total = cost
    return packs


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (another C library)."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`).

    Called between chunks of a measurement. TensorFlow's CPU buffers (and
    NumPy arrays below glibc's mmap threshold) come from the heap, whose
    freed pages glibc keeps: without this, a transformer block
    measured in 5 chunks of 54 samples grew by 2,397-2,428 MiB against
    1,764 MiB for one chunk; with it, by 2,040-2,080 MiB, and the memory is
    returned when the measurement ends. Returns False where the C library
    has no `malloc_trim` (nothing is done).
    """
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
