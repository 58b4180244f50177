"""Label codecs: error bounds, sizes, the shard writer/reader round trip, and GIFT-loss error."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from softserve.client.losses import cosine_loss, gift_loss
from softserve.errors import InputError
from softserve.format.augment import NUM_PARAMS
from softserve.format.codecs import CODECS, Codec, TopKCodec, get_codec, part_name
from softserve.format.refinement import recover_logits, refine_labels
from softserve.storage.layout import MANIFEST_FILE, shard_file
from softserve.storage.layout import tmp_path as partial_path
from softserve.storage.manifest import (
    LabelSetConfig,
    Manifest,
    ProducerInfo,
    RefinementInfo,
    TeacherInfo,
    ViewInfo,
    write_model,
)
from softserve.storage.reader import LabelSetReader
from softserve.storage.shards import NORM
from softserve.storage.writer import ShardWriter, shard_info, write_dataset

FP32_EPS = float(np.finfo(np.float32).eps)
# Bytes per label row as codecs.py documents them.
DOCUMENTED_BYTES = {
    "fp32": lambda k: 4 * k,
    "fp16": lambda k: 2 * k,
    "int8": lambda k: k + 8,
    "topk:3": lambda k: 2 * 3 + 3 * (1 if k <= 256 else 2) + 2,
    "topk:3+int2": lambda k: 2 * 3 + 3 * (1 if k <= 256 else 2) + -(-k * 2 // 8) + 8,
    "topk:3+int4": lambda k: 2 * 3 + 3 * (1 if k <= 256 else 2) + -(-k * 4 // 8) + 8,
}
#: Every codec under test: the fixed ones and a member of the top-k family.
ALL_CODECS = sorted(DOCUMENTED_BYTES)


def realistic_logits(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """randn * 5 logits with some large rows, a constant row and a row of tiny values."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 5).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    rows = len(flat)
    flat[rng.choice(rows, size=max(1, rows // 10), replace=False)] *= 60  # |x| up to ~1000
    flat[0] = 3.25
    flat[1] = rng.standard_normal(shape[-1]).astype(np.float32) * 1e-6  # fp16 subnormals
    flat[2, 0] = 0.0
    return x


def roundtrip(codec: Codec, x: np.ndarray) -> np.ndarray:
    """Encode then decode."""
    return codec.decode(codec.encode(x), x.shape[-1])


def error_bound(name: str, x: np.ndarray) -> np.ndarray:
    """Elementwise worst-case absolute error of a codec on x, as documented.

    fp16: half an ulp, 2^-11 relative for normal numbers and 2^-25 absolute for subnormals.
    int8: half a step of the per-row affine grid, (max - min) / 510, plus float32 rounding of
    the affine arithmetic (a few ulps of the row's magnitude) and 1e-6.
    """
    if name == "fp32":
        return np.zeros_like(x)
    if name == "fp16":
        return 2.0**-11 * np.abs(x) + 2.0**-25
    if name == "int8":
        lo = x.min(axis=-1, keepdims=True)
        hi = x.max(axis=-1, keepdims=True)
        mag = np.maximum(np.abs(lo), np.abs(hi))
        return (hi - lo) / 510.0 * (1 + 1e-5) + 4 * FP32_EPS * mag + 1e-6 + np.zeros_like(x)
    if name.startswith("topk:") and "+int" in name:  # the largest k to fp16; the rest on a grid
        k, bits = (int(v) for v in name.removeprefix("topk:").split("+int"))
        rest = np.sort(x, axis=-1)[..., :-k]  # every entry but the k largest
        lo, hi = rest.min(axis=-1, keepdims=True), rest.max(axis=-1, keepdims=True)
        mag = np.abs(x).max(axis=-1, keepdims=True)
        grid = (hi - lo) / (2 * ((1 << bits) - 1)) * (1 + 1e-5) + 4 * FP32_EPS * mag + 1e-6
        return np.maximum(grid, 2.0**-11 * np.abs(x) + 2.0**-25)
    if name.startswith("topk:"):  # the largest k to fp16; the rest by at most the row's range
        spread = x.max(axis=-1, keepdims=True) - x.min(axis=-1, keepdims=True)
        mag = np.abs(x).max(axis=-1, keepdims=True)
        return spread * (1 + 2.0**-10) + 2.0**-11 * mag + 2.0**-25 + np.zeros_like(x)
    raise AssertionError(f"no stated bound for codec {name!r}; add one to this test")


def test_every_codec_has_a_bound() -> None:
    """Each registered codec is covered by this file's bounds and documented sizes."""
    assert set(CODECS) | {"topk:3", "topk:3+int2", "topk:3+int4"} == set(DOCUMENTED_BYTES)


@pytest.mark.parametrize("name", ALL_CODECS)
@pytest.mark.parametrize("shape", [(3, 37, 10), (64, 100), (5, 1000)])
def test_codec_roundtrip_within_bound(name: str, shape: tuple[int, ...]) -> None:
    """Decoded labels are float32, same shape, and within the codec's stated error bound."""
    codec = get_codec(name)
    x = realistic_logits(shape, seed=len(shape))
    y = roundtrip(codec, x)
    assert y.dtype == np.float32 and y.shape == x.shape
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    assert (err <= error_bound(name, x.astype(np.float64))).all()
    if name == "fp32":
        assert np.array_equal(y, x)


@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_codec_constant_rows_exact(name: str) -> None:
    """Rows with max == min decode exactly (int8 stores a zero scale), whatever the value."""
    x = np.stack([np.full(10, v, dtype=np.float32) for v in (0.0, -7.5, 3.1415927, 1234.5)])
    assert np.array_equal(roundtrip(CODECS[name], x), x)


def test_fp16_clips_instead_of_overflowing() -> None:
    """Values beyond the fp16 range decode to +-65504, never inf."""
    x = np.array([[1e5, -1e6, 1.0, 65504.0]], dtype=np.float32)
    y = roundtrip(CODECS["fp16"], x)
    assert np.isfinite(y).all()
    assert y.tolist() == [[65504.0, -65504.0, 1.0, 65504.0]]


def test_fp16_decode_is_the_exact_cast_of_every_half() -> None:
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    frozen = halves.copy()
    frozen.flags.writeable = False  # read-only input takes numpy's path
    for stored in (halves, frozen, halves[:, ::2]):
        decoded = CODECS["fp16"].decode({"": stored}, 256)
        assert decoded.dtype == np.float32
        assert np.array_equal(decoded, stored.astype(np.float32), equal_nan=True)


def test_int8_hits_row_extremes() -> None:
    """int8's grid ends on each row's min and max (to float32 rounding)."""
    x = realistic_logits((50, 20), seed=9)
    y = roundtrip(CODECS["int8"], x)
    mag = np.abs(x).max(axis=1)
    assert (np.abs(y.min(1) - x.min(1)) <= 4 * FP32_EPS * mag).all()
    assert (np.abs(y.max(1) - x.max(1)) <= 4 * FP32_EPS * mag).all()


@pytest.mark.parametrize("name", ALL_CODECS)
@pytest.mark.parametrize("shape", [(3, 37, 10), (64, 100), (4, 300)])
def test_bytes_per_label_matches_encoded_arrays(name: str, shape: tuple[int, ...]) -> None:
    """bytes_per_label(K) is the stored bytes per row, and the documented figure."""
    codec = get_codec(name)
    k = shape[-1]
    encoded = codec.encode(realistic_logits(shape, seed=1))
    rows = int(np.prod(shape[:-1]))
    assert sum(a.nbytes for a in encoded.values()) == codec.bytes_per_label(k) * rows
    assert codec.bytes_per_label(k) == DOCUMENTED_BYTES[name](k)
    assert set(encoded) == {p.suffix for p in codec.parts(k)}
    for part in codec.parts(k):
        a = encoded[part.suffix]
        assert a.dtype == part.dtype
        assert a.shape == (*shape[:-1], *part.row_shape(k))


# --- top-k ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "classes"), [(1, 10), (3, 10), (5, 100), (10, 1000)])
def test_topk_keeps_the_largest_exactly_and_the_mean_of_the_rest(k: int, classes: int) -> None:
    """Values and indices of the k largest (to fp16), the mean of the others (to fp16) in
    every other class; checked against a sort written here."""
    x = realistic_logits((40, classes), seed=k)
    codec = TopKCodec(k)
    parts = codec.encode(x)
    for row, values, index, tail in zip(x, parts[""], parts["index"], parts["tail"], strict=True):
        ranked = sorted(range(classes), key=lambda c: (-float(row[c]), c))
        assert index.tolist() == ranked[:k]
        assert values.tolist() == row[ranked[:k]].astype(np.float16).tolist()
        rest = np.float64(row[ranked[k:]].astype(np.float64).mean())
        assert float(tail) == float(np.float16(rest))
    decoded = codec.decode(parts, classes)
    for row, out, index in zip(x, decoded, parts["index"], strict=True):
        others = np.setdiff1d(np.arange(classes), index)
        assert np.all(out[others] == np.float32(np.float16(row[others].astype(np.float64).mean())))
        assert np.all(out[index] == row[index].astype(np.float16).astype(np.float32))
    assert parts["index"].dtype == (np.uint8 if classes <= 256 else np.uint16)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize(("k", "classes"), [(1, 10), (3, 7), (10, 1000)])
def test_topk_tail_keeps_the_top_k_and_every_other_class_on_its_grid(
    k: int, classes: int, bits: int
) -> None:
    """topk:k+intb keeps what topk:k keeps, exactly as it does; every other class decodes to
    a point of its row's (2^b)-level grid over the rest's range, the nearest one; NumPy and
    torch decode bit for bit alike."""
    x = realistic_logits((40, classes), seed=k + bits)
    codec = get_codec(f"topk:{k}+int{bits}")
    parts = codec.encode(x)
    plain = TopKCodec(k).encode(x)
    assert np.array_equal(parts["index"], plain["index"])
    assert np.array_equal(parts[""], plain[""])
    decoded = codec.decode(parts, classes)
    tensors = {s: torch.from_numpy(a) for s, a in parts.items()}
    assert np.array_equal(codec.decode(tensors, classes).numpy(), decoded)
    levels = (1 << bits) - 1
    for row, out, index in zip(x, decoded, parts["index"], strict=True):
        assert np.array_equal(out[index], row[index].astype(np.float16).astype(np.float32))
        others = np.setdiff1d(np.arange(classes), index)
        rest = row[others].astype(np.float64)
        lo, step = rest.min(), (rest.max() - rest.min()) / levels
        if step == 0:
            assert np.array_equal(out[others], row[others])
            continue
        grid = lo + step * np.arange(levels + 1)
        nearest = grid[np.abs(rest[:, None] - grid[None, :]).argmin(axis=1)]
        assert np.allclose(out[others], nearest, rtol=0, atol=1e-4 * max(1.0, np.abs(rest).max()))


def test_topk_ties_go_to_the_lower_class() -> None:
    """Equal values: the lower class index is kept, the same way every time."""
    x = np.array([[1.0, 2.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0]], dtype=np.float32)
    parts = TopKCodec(2).encode(x)
    assert parts["index"].tolist() == [[1, 2], [0, 1]]
    assert parts["tail"].astype(np.float32).tolist() == [1.0, 5.0]  # (1 + 2 + 0) / 3, 5
    assert np.array_equal(TopKCodec(2).decode(parts, 5)[1], x[1])


@pytest.mark.parametrize("classes", [3, 4])
def test_topk_needs_fewer_kept_than_classes(classes: int) -> None:
    """k >= K is refused with a message that says what to use instead."""
    with pytest.raises(InputError, match="topk:4 keeps all"):
        TopKCodec(4).check(classes)
    with pytest.raises(InputError, match="topk:4"):
        TopKCodec(4).encode(np.zeros((2, classes), np.float32))


@pytest.mark.parametrize(
    "name",
    ["topk:0", "topk:x", "top:3", "topk:", "fp8", "topk:²", "topk:٣", "topk:3+int3",
     "topk:3+int", "topk:3+fp2", "topk:3+int²", "topk:0+int2", "topk:3+int2+int2"],
)  # fmt: skip
def test_bad_codec_names_are_refused(name: str) -> None:
    with pytest.raises(InputError, match="codec"):
        get_codec(name)


# --- storage round trip through ShardWriter and LabelSetReader ------------------------------

N, K, EPOCHS, SHARD_EPOCHS, CHUNK_ROWS = 37, 10, 5, 3, 8
IMAGE_SHAPE = (1, 6, 5)


def build_label_set(root: Path, codec_name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Write dataset, shards (label writes spanning epochs) and a manifest; return the truth."""
    rng = np.random.default_rng(seed)
    codec = get_codec(codec_name)
    images = rng.integers(0, 256, size=(N, *IMAGE_SHAPE), dtype=np.uint8)
    hard = rng.integers(0, K, size=N)
    names = [f"c{i}" for i in range(K)]
    dataset = write_dataset(root / "dataset.h5", images, hard, names, (0.5,), (0.25,))
    orders = np.stack([rng.permutation(N) for _ in range(EPOCHS)])
    params = rng.integers(0, 200, size=(EPOCHS, N, NUM_PARAMS)).astype(np.int32)
    params[..., 4] = rng.integers(0, 2, size=(EPOCHS, N))
    logits = realistic_logits((EPOCHS, N, K), seed=seed)
    flat_hard = torch.from_numpy(hard[orders.reshape(-1)])
    refined = refine_labels(torch.from_numpy(logits.reshape(-1, K)), flat_hard)
    refined = refined.numpy().reshape(EPOCHS, N, K)
    norm = np.linalg.norm(logits, axis=-1).astype(np.float32)

    ranges = [(s, min(s + SHARD_EPOCHS, EPOCHS)) for s in range(0, EPOCHS, SHARD_EPOCHS)]
    shards = []
    for index, (start, stop) in enumerate(ranges):
        path = root / shard_file(index)
        writer = ShardWriter(path, start, stop, N, K, codec, CHUNK_ROWS)
        for epoch in range(start, stop):
            writer.write_epoch_plan(epoch, orders[epoch], params[epoch])
        flat_refined = refined[start:stop].reshape(-1, K)
        flat_norm = norm[start:stop].reshape(-1)
        step = 23  # not a divisor of N: writes span epoch boundaries
        for pos in range(0, len(flat_refined), step):
            writer.write_labels(pos, flat_refined[pos : pos + step], flat_norm[pos : pos + step])
        assert list(root.glob(f"{path.name}*")) == []  # nothing on disk before commit
        writer.commit()
        assert path.exists() and not partial_path(path).exists()
        shards.append(shard_info(path, start, stop))

    config = LabelSetConfig(
        num_samples=N,
        num_classes=K,
        class_names=names,
        image_shape=IMAGE_SHAPE,
        dataset_sha256=dataset.sha256,
        mean=(0.5,),
        std=(0.25,),
        teacher=TeacherInfo(spec="test:none"),
        views=ViewInfo(scale=(0.08, 1.0), ratio=(0.75, 4 / 3), flip=True, output_size=(6, 5)),
        refinement=RefinementInfo(alpha=0.1, beta=0.1),
        epochs=EPOCHS,
        seed=seed,
        codec=codec_name,
        precision="fp32",
        shard_epochs=SHARD_EPOCHS,
        chunk_rows=CHUNK_ROWS,
    )
    assert [(s.epoch_start, s.epoch_stop) for s in shards] == config.shard_ranges()
    manifest = Manifest(
        name="roundtrip",
        created=datetime.now(timezone.utc),
        config=config,
        dataset=dataset,
        shards=shards,
        producer=ProducerInfo(
            softserve_version="test", torch_version=torch.__version__, device="cpu", batch_size=8
        ),
    )
    write_model(root / MANIFEST_FILE, manifest)
    return {
        "images": images, "hard": hard, "order": orders, "params": params, "soft": refined,
        "logits": logits, NORM: norm,
    }  # fmt: skip


@pytest.mark.parametrize("name", [*sorted(CODECS), "topk:3", "topk:3+int2"])
def test_shard_roundtrip_through_reader(tmp_path: Path, name: str) -> None:
    """read(epoch, start, stop) returns orders, params and norms exactly, refined labels
    within the codec's bound, and logits recovered from them within that bound times ‖t‖."""
    truth = build_label_set(tmp_path, name)
    with LabelSetReader(tmp_path) as reader:
        assert np.array_equal(reader.images(), truth["images"])
        assert np.array_equal(reader.hard_labels(), truth["hard"])
        assert np.array_equal(reader.images(3, 9), truth["images"][3:9])
        for epoch in range(EPOCHS):
            for start, stop in [(0, N), (5, 30), (0, 1), (N - 1, N), (7, 16)]:
                got = reader.read(epoch, start, stop)
                assert np.array_equal(got["order"], truth["order"][epoch, start:stop])
                assert np.array_equal(got["params"], truth["params"][epoch, start:stop])
                assert np.array_equal(got[NORM], truth[NORM][epoch, start:stop])
                x = truth["soft"][epoch, start:stop].astype(np.float64)
                bound = error_bound(name, x)
                for field, scale in (("soft", 1), ("logits", got[NORM][:, None])):
                    y = got[field]
                    assert y.dtype == np.float32 and y.shape == (stop - start, K)
                    exact = truth[field][epoch, start:stop].astype(np.float64)
                    assert (np.abs(y - exact) <= bound * scale * (1 + 1e-5) + 1e-4).all()
        only = reader.read(1, 2, 4, fields=["logits"])
        assert set(only) == {"logits"}
        with pytest.raises(IndexError):
            reader.read(EPOCHS, 0, 1)


def test_logits_are_exact_from_fp32_refined_labels(tmp_path: Path) -> None:
    """An fp32 set gives back the teacher's logits to float32 rounding: one label field per
    view loses nothing the baselines need."""
    truth = build_label_set(tmp_path, "fp32")
    with LabelSetReader(tmp_path) as reader:
        for epoch in range(EPOCHS):
            got = reader.read(epoch, 0, N, fields=["logits"])["logits"]
            np.testing.assert_allclose(got, truth["logits"][epoch], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("classes", [2, 10, 1000])
def test_recover_logits_inverts_refine_labels(classes: int) -> None:
    """t = ‖t‖·(r − β·s/‖s‖) for every α, β: refining then recovering is the identity."""
    g = torch.Generator().manual_seed(classes)
    t = torch.randn(64, classes, generator=g, dtype=torch.float64) * 7
    y = torch.randint(0, classes, (64,), generator=g)
    for alpha, beta in [(0.1, 0.1), (0.0, 1.0), (0.3, 0.0)]:
        r = refine_labels(t, y, alpha, beta)
        back = recover_logits(r, y, t.norm(dim=1), alpha, beta)
        torch.testing.assert_close(back.double(), t, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ALL_CODECS)
def test_decode_as_float16(name: str) -> None:
    """float16 labels: the fp16 codec's as stored (no copy), others are float32's, rounded and
    clipped to float16's range rather than overflowing to inf."""
    codec = get_codec(name)
    x = realistic_logits((64, 10), seed=3)
    x[3, :2] = [1e6, -1e6]
    parts = codec.encode(x)
    half = codec.decode_as(parts, 10, np.float16)
    assert half.dtype == np.float16 and half.shape == x.shape and np.isfinite(half).all()
    assert np.array_equal(half, codec.decode(parts, 10).clip(-65504, 65504).astype(np.float16))
    assert (half[3, :2] == [65504, -65504]).all()
    assert np.shares_memory(half, parts[""]) == (name == "fp16")
    assert codec.decode_as(parts, 10, np.float32).dtype == np.float32
    with pytest.raises(ValueError, match="float32 or float16"):
        codec.decode_as(parts, 10, np.float64)


def test_shard_stores_one_label_field(tmp_path: Path) -> None:
    """A format-2 shard holds order, params, the refined labels' codec parts and the norms,
    with the shard's epochs, and nothing else: no second label field."""
    import h5py

    build_label_set(tmp_path, "int8")
    with h5py.File(tmp_path / shard_file(1), "r") as f:
        e = EPOCHS - SHARD_EPOCHS
        parts = CODECS["int8"].parts(K)
        assert set(f) == {"order", "params", NORM} | {part_name("soft", p.suffix) for p in parts}
        assert f["order"].shape == (e, N)
        assert f["params"].shape == (e, N, NUM_PARAMS)
        assert f[NORM].shape == (e, N) and f[NORM].dtype == np.float32
        for part in parts:
            ds = f[part_name("soft", part.suffix)]
            assert ds.shape == (e, N, *part.row_shape(K))
            assert ds.dtype == part.dtype
        assert int(f.attrs["format_version"]) == 3
        assert int(f.attrs["epoch_start"]) == SHARD_EPOCHS
        assert int(f.attrs["epoch_stop"]) == EPOCHS


def test_shard_abort_leaves_no_file(tmp_path: Path) -> None:
    """An aborted shard never reaches the disk, under any name."""
    path = tmp_path / shard_file(0)
    writer = ShardWriter(path, 0, 2, N, K, CODECS["fp16"], CHUNK_ROWS)
    writer.write_epoch_plan(0, np.arange(N), np.zeros((N, NUM_PARAMS), dtype=np.int32))
    rows = realistic_logits((N + 5, K), seed=0)
    writer.write_labels(0, rows, np.ones(N + 5, np.float32))
    assert list(tmp_path.iterdir()) == []
    writer.abort()
    assert not path.exists() and not partial_path(path).exists()
    assert list(tmp_path.iterdir()) == []


# --- what each codec costs on the GIFT loss -------------------------------------------------

# Measured: fp16 ~2e-6, int8 ~6e-5 on these inputs; the bounds leave a 15x margin.
GIFT_LOSS_BOUNDS = {"fp32": 0.0, "fp16": 1e-4, "int8": 1e-3}


@pytest.mark.parametrize("name", sorted(GIFT_LOSS_BOUNDS))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_codec_gift_loss_error(name: str, num_classes: int) -> None:
    """Storing refined labels (or teacher logits) in a codec moves the GIFT loss very little."""
    g = torch.Generator().manual_seed(num_classes)
    teacher = torch.randn(256, num_classes, generator=g) * 5
    hard = torch.randint(0, num_classes, (256,), generator=g)
    refined = refine_labels(teacher, hard)
    codec = CODECS[name]
    bound = GIFT_LOSS_BOUNDS[name]
    for student in (torch.randn(256, num_classes, generator=g) * 3, refined + 0.05 * teacher):
        exact = float(cosine_loss(student, refined))
        stored = torch.from_numpy(roundtrip(codec, refined.numpy()))
        assert abs(float(cosine_loss(student, stored)) - exact) <= bound
        logits = torch.from_numpy(roundtrip(codec, teacher.numpy()))
        assert abs(float(gift_loss(student, logits, hard)) - exact) <= bound


@pytest.mark.parametrize("k", [1, 3, 10, 49])
def test_top_k_indices_equal_a_stable_descending_sort(k: int) -> None:
    """The partition-based selection gives exactly a stable argsort's first k columns, on
    rows full of ties, on constant rows, and in more than two dimensions."""
    from softserve.format.codecs import top_k_indices

    rng = np.random.default_rng(k)
    rows = np.round(rng.standard_normal((4, 500, 50)), 1).astype(np.float32)
    rows[0, :10] = 0.0
    expected = np.argsort(-rows, axis=-1, kind="stable")[..., :k]
    assert np.array_equal(top_k_indices(rows, k), expected)


@pytest.mark.parametrize(("n", "row_bytes"), [(10_000, 6), (10_000, 42), (37, 10), (1, 4000)])
def test_chunks_split_the_samples_evenly(n: int, row_bytes: int) -> None:
    """Chunks of about 64 KiB whose padding (the last chunk's unused rows) is under one
    row per chunk: a fixed power-of-two size padded topk:1 sets by ~60%."""
    from softserve.storage.writer import chunk_rows_for

    rows = chunk_rows_for(n, row_bytes)
    chunks = -(-n // rows)
    assert 1 <= rows <= n and chunks * rows - n < chunks
    assert rows * row_bytes <= 2 * 65536 or rows <= 16
