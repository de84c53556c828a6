"""MXNet ``.params`` reader/writer.

The files here are assembled byte by byte with ``struct`` from the format description (MXNet
``ndarray.cc``), independently of :mod:`wsss_bench.weights.mxnet`'s writer, so a shared
misunderstanding between reader and writer cannot hide.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from wsss_bench.errors import UserError, WeightsError
from wsss_bench.weights.mxnet import (
    encode_ndarray_list,
    is_params_file,
    parse_ndarray_list,
    read_ndarray_list,
    read_params,
    write_params,
)

V1, V2, V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
FLAGS = {0: "<f4", 1: "<f8", 2: "<f2", 3: "u1", 4: "<i4", 5: "i1", 6: "<i8"}


# -- hand-made byte builders ----------------------------------------------------------------------
def header(n: int) -> bytes:
    return struct.pack("<QQQ", 0x112, 0, n)


def names_block(names: list[str]) -> bytes:
    out = struct.pack("<Q", len(names))
    for name in names:
        raw = name.encode()
        out += struct.pack("<Q", len(raw)) + raw
    return out


def tshape(shape: tuple[int, ...]) -> bytes:
    return struct.pack("<i", len(shape)) + b"".join(struct.pack("<q", d) for d in shape)


def tail(arr: np.ndarray, flag: int, dev_type: int = 1) -> bytes:
    """Context (dev_type, dev_id 0), dtype flag, raw little-endian C-order data."""
    return struct.pack("<ii", dev_type, 0) + struct.pack("<i", flag) + arr.astype(FLAGS[flag]).tobytes()


def record(version: str, arr: np.ndarray, flag: int, dev_type: int = 1) -> bytes:
    if version in ("v2", "v3"):
        magic = V2 if version == "v2" else V3
        return struct.pack("<I", magic) + struct.pack("<i", 0) + tshape(arr.shape) + tail(arr, flag, dev_type)
    if version == "v1":
        return struct.pack("<I", V1) + tshape(arr.shape) + tail(arr, flag, dev_type)
    assert version == "legacy"
    dims = b"".join(struct.pack("<I", d) for d in arr.shape)
    return struct.pack("<I", arr.ndim) + dims + tail(arr, flag, dev_type)


def sample_arrays() -> list[tuple[str, np.ndarray, int]]:
    """One array per dtype flag 0..6, with names in MXNet's arg:/aux: style."""
    rng = np.random.default_rng(0)
    return [
        ("arg:conv1a_weight", rng.standard_normal((4, 3, 3, 3)).astype("<f4"), 0),
        ("aux:bn7_moving_var", rng.random(5).astype("<f8"), 1),
        ("arg:half", rng.standard_normal((3, 1)).astype("<f2"), 2),  # 6 bytes: misaligns the next array
        ("arg:bytes", np.arange(7, dtype="u1").reshape(7), 3),
        ("arg:ints", np.arange(-6, 6, dtype="<i4").reshape(3, 4), 4),
        ("arg:small", np.array([-128, 0, 127], dtype="i1"), 5),
        ("aux:longs", np.array([[2**40, -(2**40)]], dtype="<i8"), 6),
    ]


def build_file(version: str, items: list[tuple[str, np.ndarray, int]], named: bool = True) -> bytes:
    body = b"".join(record(version, arr, flag) for _, arr, flag in items)
    names = names_block([n for n, _, _ in items]) if named else struct.pack("<Q", 0)
    return header(len(items)) + body + names


def write(tmp_path: Path, data: bytes, name: str = "weights.params") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- reading every version and dtype --------------------------------------------------------------
@pytest.mark.parametrize("version", ["v3", "v2", "v1", "legacy"])
def test_reads_every_version_and_dtype(tmp_path: Path, version: str) -> None:
    items = sample_arrays()
    path = write(tmp_path, build_file(version, items))
    assert is_params_file(path)
    got = read_params(path)
    assert list(got) == [n for n, _, _ in items]  # order and arg:/aux: prefixes kept
    for name, arr, flag in items:
        assert got[name].dtype == np.dtype(FLAGS[flag]).newbyteorder("=")
        assert got[name].shape == arr.shape
        np.testing.assert_array_equal(got[name], arr)
        assert got[name].flags.aligned and got[name].flags.c_contiguous


def test_arrays_read_from_a_file_are_writable(tmp_path: Path) -> None:
    # torch.from_numpy warns on read-only arrays; the reader reads into a writable buffer.
    got = read_params(write(tmp_path, build_file("v2", sample_arrays()[:1])))
    assert got["arg:conv1a_weight"].flags.writeable


def test_unnamed_list(tmp_path: Path) -> None:
    items = sample_arrays()[:2]
    path = write(tmp_path, build_file("v2", items, named=False))
    arrays, names = read_ndarray_list(path)
    assert names is None and len(arrays) == 2
    np.testing.assert_array_equal(arrays[1], items[1][1])
    with pytest.raises(WeightsError, match=r"weights\.params: .*2 unnamed arrays"):
        read_params(path)


def test_empty_list() -> None:
    assert parse_ndarray_list(header(0) + struct.pack("<Q", 0)) == ([], None)


def test_v2_and_legacy_ndim0_is_an_empty_array() -> None:
    # ndim 0 ends the record right after the shape: no context, dtype or data follow.
    v2_empty = struct.pack("<Ii", V2, 0) + struct.pack("<i", 0)
    legacy_empty = struct.pack("<I", 0)
    v1_empty = struct.pack("<I", V1) + struct.pack("<i", 0)
    after = record("v2", np.array([1.5, 2.5], "<f4"), 0)
    data = header(4) + v2_empty + legacy_empty + v1_empty + after + names_block(["a", "b", "c", "d"])
    arrays, names = parse_ndarray_list(data)
    assert [a.size for a in arrays] == [0, 0, 0, 2]
    np.testing.assert_array_equal(arrays[3], [1.5, 2.5])


def test_v3_scalar_and_unknown_shape() -> None:
    # V3 uses numpy shape semantics: ndim 0 is a scalar with one element; ndim -1 is "unknown"
    # (an empty array whose record ends after the shape).
    scalar = struct.pack("<Ii", V3, 0) + struct.pack("<i", 0) + struct.pack("<iii", 1, 0, 1) + struct.pack("<d", 3.25)
    unknown = struct.pack("<Ii", V3, 0) + struct.pack("<i", -1)
    data = header(2) + scalar + unknown + names_block(["s", "u"])
    arrays, _ = parse_ndarray_list(data)
    assert arrays[0].shape == () and arrays[0].dtype == np.float64 and arrays[0] == 3.25
    assert arrays[1].size == 0


def test_zero_size_dimension() -> None:
    data = header(1) + record("v2", np.zeros((0, 3), "<f4"), 0) + names_block(["z"])
    arrays, _ = parse_ndarray_list(data)
    assert arrays[0].shape == (0, 3)


def test_gpu_and_pinned_contexts_are_accepted() -> None:
    arr = np.ones(2, "<f4")
    data = header(2) + record("v2", arr, 0, dev_type=2) + record("v1", arr, 0, dev_type=3) + names_block(["g", "p"])
    arrays, _ = parse_ndarray_list(data)
    assert all(a.sum() == 2 for a in arrays)


# -- malformed files ---------------------------------------------------------------------------
def test_truncated_file_names_byte_and_array(tmp_path: Path) -> None:
    items = sample_arrays()[:3]
    data = build_file("v2", items)
    second_start = len(header(3) + record("v2", items[0][1], 0))
    cut = second_start + 30  # inside the second array's data
    path = write(tmp_path, data[:cut])
    with pytest.raises(WeightsError, match=rf"^{path}: truncated at byte {cut} while reading array 2 of 3"):
        read_params(path)


@pytest.mark.parametrize("version", ["v3", "v2", "v1", "legacy"])
def test_every_truncation_is_a_weights_error(version: str) -> None:
    data = build_file(version, sample_arrays()[:3])
    for cut in range(len(data)):
        with pytest.raises(WeightsError):
            parse_ndarray_list(data[:cut], source="x.params")


def test_truncated_names_list() -> None:
    data = build_file("v1", sample_arrays()[:2])
    with pytest.raises(WeightsError, match=r"truncated .* while reading name 2 of 2"):
        parse_ndarray_list(data[:-3], source="w.params")


def test_trailing_bytes(tmp_path: Path) -> None:
    data = build_file("v2", sample_arrays()[:2])
    path = write(tmp_path, data + b"\0\0\0")
    with pytest.raises(WeightsError, match=rf"{path}: 3 trailing bytes after byte {len(data)}"):
        read_params(path)


def test_bad_list_magic(tmp_path: Path) -> None:
    path = write(tmp_path, struct.pack("<QQQ", 0x113, 0, 0) + struct.pack("<Q", 0))
    with pytest.raises(WeightsError, match=r"not an MXNet \.params file \(magic 0x113"):
        read_params(path)
    assert not is_params_file(path)
    zip_like = write(tmp_path, b"PK\x03\x04" + b"\0" * 40, "model.pth")
    with pytest.raises(WeightsError, match="zip archive"):
        read_params(zip_like)


def test_unknown_record_version() -> None:
    rec = record("v2", np.ones(2, "<f4"), 0)
    bad = struct.pack("<I", 0xF993FACB) + rec[4:]
    with pytest.raises(WeightsError, match=r"x\.params: unknown NDArray record version 0xF993FACB at byte 24 while reading array 1 of 1"):
        parse_ndarray_list(header(1) + bad + names_block(["a"]), source="x.params")


@pytest.mark.parametrize("flag", [7, 12, -1])
def test_unknown_dtype_flag(flag: int) -> None:
    arr = np.ones(2, "<f4")
    rec = struct.pack("<I", V1) + tshape(arr.shape) + struct.pack("<iii", 1, 0, flag) + arr.tobytes()
    with pytest.raises(WeightsError, match=rf"unknown dtype flag {flag} .* while reading array 2 of 2"):
        parse_ndarray_list(header(2) + record("v1", arr, 0) + rec + names_block(["a", "b"]))


def test_invalid_dev_type() -> None:
    rec = record("legacy", np.ones(2, "<f4"), 0, dev_type=7)
    with pytest.raises(WeightsError, match="invalid context dev_type 7"):
        parse_ndarray_list(header(1) + rec + names_block(["a"]))


@pytest.mark.parametrize(("stype", "word"), [(1, "row_sparse"), (2, "csr"), (5, "unknown storage type 5")])
def test_sparse_and_unknown_storage_rejected(stype: int, word: str) -> None:
    rec = struct.pack("<Ii", V2, stype) + tshape((2,)) + tshape((4,)) + b"\0" * 64
    with pytest.raises(WeightsError, match=word):
        parse_ndarray_list(header(1) + rec + names_block(["emb"]))


def test_names_count_must_match() -> None:
    items = sample_arrays()[:3]
    body = b"".join(record("v2", a, f) for _, a, f in items)
    with pytest.raises(WeightsError, match=r"3 arrays but 2 names"):
        parse_ndarray_list(header(3) + body + names_block(["a", "b"]))


def test_duplicate_names(tmp_path: Path) -> None:
    arr = np.ones(1, "<f4")
    data = header(2) + record("v2", arr, 0) * 2 + names_block(["arg:w", "arg:w"])
    with pytest.raises(WeightsError, match="duplicate array name 'arg:w'"):
        read_params(write(tmp_path, data))


def test_absurd_array_count() -> None:
    with pytest.raises(WeightsError, match=r"claims 1000000 arrays"):
        parse_ndarray_list(header(1_000_000) + b"\0" * 16)


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.params: cannot read"):
        read_params(tmp_path / "nope.params")


# -- writer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v3", "v2", "v1", "legacy"])
def test_writer_matches_hand_built_bytes(version: str) -> None:
    items = sample_arrays()
    arrays = {n: a for n, a, _ in items}
    assert encode_ndarray_list(arrays, version) == build_file(version, items)
    unnamed = encode_ndarray_list([a for _, a, _ in items], version)
    assert unnamed == build_file(version, items, named=False)


@pytest.mark.parametrize("version", ["v3", "v2", "v1", "legacy"])
def test_round_trip(tmp_path: Path, version: str) -> None:
    rng = np.random.default_rng(1)
    arrays = {
        "arg:w": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "aux:big_endian": np.arange(6, dtype=">f4").reshape(2, 3),  # converted to little-endian
        "strided": np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2],  # non-contiguous view
        "f16": rng.standard_normal(5).astype(np.float16),
        "u8": np.arange(3, dtype=np.uint8),
    }
    path = tmp_path / "out.params"
    write_params(path, arrays, version=version)
    assert not (tmp_path / "out.params.tmp").exists()
    got = read_params(path)
    assert list(got) == list(arrays)
    for name, arr in arrays.items():
        assert got[name].dtype == arr.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got[name], arr)


def test_writer_rejects_what_the_format_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="bool"):
        write_params(tmp_path / "a.params", {"m": np.ones(2, dtype=bool)})
    with pytest.raises(WeightsError, match="0-d arrays need version='v3'"):
        write_params(tmp_path / "b.params", {"s": np.float32(1.0)}, version="v2")
    write_params(tmp_path / "c.params", {"s": np.array(2.0, dtype=np.float32)}, version="v3")
    assert read_params(tmp_path / "c.params")["s"] == 2.0
    with pytest.raises(ValueError, match="version"):
        write_params(tmp_path / "d.params", {}, version="v4")
    assert not list(tmp_path.glob("*.tmp"))
