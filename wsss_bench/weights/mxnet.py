"""Read and write MXNet NDArray ``.params`` files with numpy alone (no ``mxnet`` import).

The ImageNet ResNet-38 weights that SC-CAM and PSA start from exist only as an MXNet
``.params`` file, and ``mxnet`` itself no longer installs on current Python.  This module
implements the byte format of ``mx.nd.save`` / ``mx.nd.load`` (``src/ndarray/ndarray.cc``):

* file: u64 magic ``0x112``, u64 reserved, u64 ``N``, ``N`` array records, u64 ``M`` (``N`` or 0),
  then ``M`` names, each a u64 byte length followed by the (ASCII/UTF-8) bytes;
* array record, chosen by its first u32:

  - ``0xF993FACA`` (V3, numpy-shape semantics) and ``0xF993FAC9`` (V2): i32 storage type, the
    storage shape if sparse, the shape, the context (i32 dev_type, i32 dev_id), the i32 dtype
    flag, sparse aux types/shapes, the raw data, sparse aux data;
  - ``0xF993FAC8`` (V1): shape, context, dtype flag, raw data;
  - anything else (legacy, before V1): the u32 *is* ndim, followed by ndim u32 dims, then the
    context, the dtype flag and the raw data.

  A shape (V1..V3) is an i32 ndim followed by ndim i64 dims.  All integers are little-endian
  and the data is C-order.

Sparse (row-sparse / CSR) records are parsed far enough to be recognised and then rejected
with a clear message: no published segmentation weights use them, and densifying them could
not be checked against a real file.

Every problem with a file raises :class:`~wsss_bench.errors.WeightsError` with one line that
names the file, the byte offset and the array being read.
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

import numpy as np

from wsss_bench.errors import WeightsError

__all__ = [
    "LIST_MAGIC",
    "V1_MAGIC",
    "V2_MAGIC",
    "V3_MAGIC",
    "DTYPE_FLAGS",
    "VERSIONS",
    "is_params_file",
    "parse_ndarray_list",
    "read_ndarray_list",
    "read_params",
    "encode_ndarray_list",
    "write_params",
]

#: Magic number of an NDArray list file (``kMXAPINDArrayListMagic``).
LIST_MAGIC = 0x112
#: Record magics, one per serialisation version.
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA

#: MXNet dtype flag -> little-endian numpy dtype (mshadow's type flags 0..6).
DTYPE_FLAGS: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
}
_FLAG_OF_DTYPE: dict[np.dtype, int] = {dt: flag for flag, dt in DTYPE_FLAGS.items()}

#: Versions :func:`write_params` can produce, newest first.
VERSIONS = ("v3", "v2", "v1", "legacy")

_STORAGE_NAMES = {1: "row_sparse", 2: "csr"}
# Context dev_type values mx.nd.save can write: cpu, gpu, cpu_pinned.
_DEV_TYPES = {1: "cpu", 2: "gpu", 3: "cpu_pinned"}
# A legacy record starts with ndim instead of a magic.  Real legacy arrays have a handful of
# dims, so anything larger is far more likely an unknown future magic or a corrupt file; the
# bound keeps such a file from being "read" as a 4-billion-dim shape.
_MAX_LEGACY_NDIM = 32

PathLike = Union[str, "os.PathLike[str]"]


class _Cursor:
    """Bounds-checked little-endian reads over one buffer.

    ``what`` describes the current item ("array 17 of 191", "name 3 of 191") so that every
    error raised while reading it can say where the file went wrong.
    """

    def __init__(self, buf: Union[bytes, bytearray, memoryview], source: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.source = source
        self.what = "the file header"

    def fail(self, problem: str, hint: str = "") -> WeightsError:
        hint = f"; {hint}" if hint else ""
        return WeightsError(f"{self.source}: {problem} while reading {self.what}{hint}")

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise WeightsError(
                f"{self.source}: truncated at byte {self.size} while reading {self.what} "
                f"({n} bytes needed at byte {self.pos})"
            )

    def _unpack(self, fmt: str, n: int) -> int:
        self.need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self) -> int:
        return self._unpack("<I", 4)

    def i32(self) -> int:
        return self._unpack("<i", 4)

    def u64(self) -> int:
        return self._unpack("<Q", 8)

    def i64s(self, n: int) -> tuple[int, ...]:
        self.need(8 * n)
        values = struct.unpack_from(f"<{n}q", self.buf, self.pos)
        self.pos += 8 * n
        return values

    def u32s(self, n: int) -> tuple[int, ...]:
        self.need(4 * n)
        values = struct.unpack_from(f"<{n}I", self.buf, self.pos)
        self.pos += 4 * n
        return values

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)
        self.need(count * dtype.itemsize)
        if count == 0:
            out = np.zeros(shape, dtype=dtype.newbyteorder("="))
        else:
            # A view, not a copy: the real file is ~400 MB and is read exactly once.
            out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).reshape(shape)
            if not out.dtype.isnative:
                out = out.astype(dtype.newbyteorder("="))  # only on big-endian hosts
            elif not out.flags.aligned:
                # Records are packed back to back, so e.g. a float32 array after an odd-sized
                # float16 one starts unaligned; torch.from_numpy and BLAS want aligned data.
                out = out.copy()
        self.pos += count * dtype.itemsize
        return out


def _empty() -> np.ndarray:
    # MXNet's "none" NDArray (no shape, no dtype, no data); the closest numpy value is an
    # empty float32 vector, which also writes back as a valid record.
    return np.zeros((0,), dtype=np.float32)


def _read_tshape(cur: _Cursor, numpy_shape: bool) -> tuple[int, ...] | None:
    """Read an i32 ndim + i64 dims shape; ``None`` means MXNet's "empty array, stop here"."""
    ndim = cur.i32()
    if ndim == -1:
        # Unknown shape (MXNet >= 1.5 writes TShape() of a none array as ndim -1).
        return None
    if ndim < 0:
        raise cur.fail(f"invalid ndim {ndim} at byte {cur.pos - 4}")
    if ndim > _MAX_LEGACY_NDIM:
        raise cur.fail(f"implausible ndim {ndim} at byte {cur.pos - 4}")
    dims = cur.i64s(ndim)
    if ndim == 0 and not numpy_shape:
        # Legacy shape semantics: ndim 0 is the empty array (V3 makes it a 0-d scalar).
        return None
    if any(d < 0 for d in dims):
        if numpy_shape and all(d >= -1 for d in dims):
            return None  # V3 "unknown" dims: MXNet also returns an empty array here
        raise cur.fail(f"negative dimension in shape {dims}")
    return tuple(dims)


def _read_record(cur: _Cursor) -> np.ndarray:
    start = cur.pos
    head = cur.u32()
    if head in (V2_MAGIC, V3_MAGIC):
        stype = cur.i32()
        if stype in _STORAGE_NAMES:
            raise cur.fail(
                f"unsupported {_STORAGE_NAMES[stype]} (sparse) storage at byte {start}",
                "save the array dense (.tostype('default')) before mx.nd.save",
            )
        if stype != 0:
            raise cur.fail(f"unknown storage type {stype} at byte {start}")
        shape = _read_tshape(cur, numpy_shape=head == V3_MAGIC)
    elif head == V1_MAGIC:
        shape = _read_tshape(cur, numpy_shape=False)
    elif head <= _MAX_LEGACY_NDIM:
        dims = cur.u32s(head)
        shape = tuple(dims) if head > 0 else None
    else:
        raise cur.fail(
            f"unknown NDArray record version 0x{head:08X} at byte {start}",
            "expected magic 0xF993FAC8/C9/CA (V1/V2/V3) or a legacy ndim <= 32",
        )
    if shape is None:
        return _empty()
    dev_type = cur.i32()
    cur.i32()  # dev_id: which GPU the array lived on, irrelevant once on disk
    if dev_type not in _DEV_TYPES:
        raise cur.fail(f"invalid context dev_type {dev_type} at byte {cur.pos - 8}")
    flag = cur.i32()
    if flag not in DTYPE_FLAGS:
        raise cur.fail(
            f"unknown dtype flag {flag} at byte {cur.pos - 4}",
            "supported: 0..6 = float32, float64, float16, uint8, int32, int8, int64",
        )
    return cur.array(DTYPE_FLAGS[flag], shape)


def is_params_file(path: PathLike) -> bool:
    """Return whether ``path`` starts with the MXNet NDArray-list magic (cheap sniff)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and struct.unpack("<Q", head)[0] == LIST_MAGIC


def parse_ndarray_list(
    buf: Union[bytes, bytearray, memoryview], source: str = "<bytes>"
) -> tuple[list[np.ndarray], list[str] | None]:
    """Parse the bytes of an NDArray list file.

    Returns the arrays in file order and their names (``None`` for an unnamed list).  Arrays
    are views into ``buf`` where alignment allows, so they are writable only if ``buf`` is.
    ``source`` names the input in error messages.
    """
    cur = _Cursor(buf, source)
    if cur.size >= 2 and bytes(buf[:2]) == b"PK":
        raise WeightsError(f"{source}: not an MXNet .params file (it is a zip archive, e.g. a PyTorch checkpoint)")
    magic = cur.u64()
    if magic != LIST_MAGIC:
        raise WeightsError(
            f"{source}: not an MXNet .params file (magic 0x{magic:X} at byte 0, expected 0x112)"
        )
    cur.u64()  # reserved; mx.nd.load ignores it too
    n = cur.u64()
    # Every record is at least 4 bytes, so a huge N is corruption, not a big file.
    if n * 4 > cur.size - cur.pos:
        raise WeightsError(
            f"{source}: header claims {n} arrays but only {cur.size - cur.pos} bytes follow "
            "(truncated or corrupt file)"
        )
    arrays: list[np.ndarray] = []
    for i in range(n):
        cur.what = f"array {i + 1} of {n}"
        arrays.append(_read_record(cur))
    cur.what = "the names list"
    m = cur.u64()
    if m not in (0, n):
        raise WeightsError(
            f"{source}: {n} arrays but {m} names at byte {cur.pos - 8} (expected {n} or 0)"
        )
    names: list[str] | None = None
    if m:
        names = []
        for i in range(m):
            cur.what = f"name {i + 1} of {m}"
            length = cur.u64()
            cur.need(length)
            raw = bytes(buf[cur.pos : cur.pos + length])
            try:
                names.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise cur.fail(f"name at byte {cur.pos} is not valid UTF-8") from None
            cur.pos += length
    if cur.pos != cur.size:
        raise WeightsError(
            f"{source}: {cur.size - cur.pos} trailing bytes after byte {cur.pos} "
            "(the names list ends there; corrupt or not a .params file)"
        )
    return arrays, names


def _read_bytes(path: PathLike) -> bytearray:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # One read into a writable buffer: numpy views of it are writable, so
            # torch.from_numpy can share the memory without copying or warning.
            buf = bytearray(size)
            got = f.readinto(buf)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights file: {exc.strerror or exc}") from None
    if got != size:
        raise WeightsError(f"{path}: file changed size while being read ({got} of {size} bytes)")
    return buf


def read_ndarray_list(path: PathLike) -> tuple[list[np.ndarray], list[str] | None]:
    """Read an NDArray list file: arrays in file order and names (``None`` if unnamed)."""
    return parse_ndarray_list(_read_bytes(path), source=str(path))


def read_params(path: PathLike) -> dict[str, np.ndarray]:
    """Read a named MXNet ``.params`` file into ``{name: array}``, names exactly as stored.

    Names keep their ``arg:``/``aux:`` prefixes.  An unnamed list or duplicate names raise
    :class:`WeightsError`, since weights cannot be matched to a model without names.
    """
    arrays, names = read_ndarray_list(path)
    if names is None:
        if not arrays:
            return {}
        raise WeightsError(
            f"{path}: the file holds {len(arrays)} unnamed arrays; weights need names "
            "(save a dict, not a list, with mx.nd.save)"
        )
    out: dict[str, np.ndarray] = {}
    for name, array in zip(names, arrays):
        if name in out:
            raise WeightsError(f"{path}: duplicate array name {name!r}")
        out[name] = array
    return out


def _le_array(array: np.ndarray, label: str) -> tuple[np.ndarray, int]:
    """Return ``array`` as C-contiguous little-endian data plus its MXNet dtype flag."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder != "|" else array.dtype
    flag = _FLAG_OF_DTYPE.get(dtype)
    if flag is None:
        raise WeightsError(
            f"{label}: dtype {array.dtype} has no MXNet dtype flag "
            "(supported: float32, float64, float16, uint8, int32, int8, int64)"
        )
    # np.asarray(order="C"), not np.ascontiguousarray, which would turn a 0-d array into 1-d.
    return np.asarray(array, dtype=dtype, order="C"), flag


def _record_chunks(array: np.ndarray, version: str, label: str) -> Iterator[Union[bytes, memoryview]]:
    data, flag = _le_array(array, label)
    shape = data.shape
    if version != "v3" and len(shape) == 0:
        # Before V3, ndim 0 *means* "empty array", so a scalar cannot be stored faithfully.
        raise WeightsError(f"{label}: 0-d arrays need version='v3' (older formats read ndim 0 as empty)")
    tshape = struct.pack(f"<i{len(shape)}q", len(shape), *shape)
    if version == "v3":
        yield struct.pack("<Ii", V3_MAGIC, 0) + tshape
    elif version == "v2":
        yield struct.pack("<Ii", V2_MAGIC, 0) + tshape
    elif version == "v1":
        yield struct.pack("<I", V1_MAGIC) + tshape
    else:  # legacy: u32 ndim + u32 dims
        if len(shape) > _MAX_LEGACY_NDIM or any(d > 0xFFFFFFFF for d in shape):
            raise WeightsError(f"{label}: shape {shape} does not fit the legacy format")
        yield struct.pack(f"<I{len(shape)}I", len(shape), *shape)
    yield struct.pack("<iii", 1, 0, flag)  # context cpu(0), then the dtype flag
    if data.size:
        yield memoryview(data.reshape(-1)).cast("B")


def _list_chunks(
    arrays: Sequence[np.ndarray], names: Sequence[str] | None, version: str
) -> Iterator[Union[bytes, memoryview]]:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    if names is not None and len(names) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays but {len(names)} names")
    yield struct.pack("<QQQ", LIST_MAGIC, 0, len(arrays))
    for i, array in enumerate(arrays):
        label = repr(names[i]) if names is not None else f"array {i}"
        yield from _record_chunks(array, version, label)
    yield struct.pack("<Q", len(names) if names is not None else 0)
    for name in names or ():
        raw = name.encode("utf-8")
        yield struct.pack("<Q", len(raw)) + raw


def _split(arrays: Union[Mapping[str, np.ndarray], Sequence[np.ndarray]]) -> tuple[list, list[str] | None]:
    if isinstance(arrays, Mapping):
        return list(arrays.values()), [str(k) for k in arrays.keys()]
    return list(arrays), None


def encode_ndarray_list(
    arrays: Union[Mapping[str, np.ndarray], Sequence[np.ndarray]], version: str = "v2"
) -> bytes:
    """Serialise arrays to the bytes :func:`write_params` would write.

    A mapping is written with its keys as names, a sequence as an unnamed list.
    """
    values, names = _split(arrays)
    return b"".join(_list_chunks(values, names, version))


def write_params(
    path: PathLike,
    arrays: Union[Mapping[str, np.ndarray], Sequence[np.ndarray]],
    version: str = "v2",
) -> None:
    """Write ``arrays`` as an MXNet ``.params`` file in format ``version``.

    ``version`` is one of :data:`VERSIONS`: ``"v3"``, ``"v2"`` (what current ``mx.nd.save``
    writes), ``"v1"`` or ``"legacy"``.  A mapping keeps its keys as names (include the
    ``arg:``/``aux:`` prefixes yourself if a consumer expects them); a sequence writes an unnamed
    list.  Every array is written as a dense CPU array.  The file is written to ``PATH.tmp``
    and renamed into place, so a reader never sees a half-written file.
    """
    values, names = _split(arrays)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in _list_chunks(values, names, version):
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
