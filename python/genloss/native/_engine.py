"""The bridge between any ``__dlpack__`` array and the C++/CUDA engine.

One job: turn user arrays into raw pointers (zero copy when contiguous),
allocate outputs of the same kind (NumPy in, NumPy out; torch in, torch out;
CuPy in, CuPy out), and call one engine primitive. No loss math lives here; the
losses in ``genloss.native.gan`` are compositions of these primitives.

Torch tensors take a fast path (``data_ptr``) instead of ``__dlpack__``: the
per-call cost matters for batch-256 losses (see bench/README.md).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _C

F = _C.FUNCTORS  # functor name -> id, generated from cpp/include/genloss/engine.h

FLOAT32, FLOAT64, FLOAT16, BFLOAT16 = 0, 1, 2, 3
INT64, INT32 = 0, 1
CPU, CUDA = 0, 1

_NP_FLOAT = {np.dtype(np.float32): FLOAT32, np.dtype(np.float64): FLOAT64}
_NP_INT = {np.dtype(np.int64): INT64, np.dtype(np.int32): INT32}
_DTYPE_NAMES = {FLOAT32: "float32", FLOAT64: "float64", FLOAT16: "float16", BFLOAT16: "bfloat16"}

_torch: Any = None
_TORCH_FLOAT: dict[Any, int] = {}
_TORCH_INT: dict[Any, int] = {}


def _torch_mod() -> Any:
    """torch, if the caller already imported it (genloss never imports it itself here)."""
    global _torch
    if _torch is None:
        t = sys.modules.get("torch")
        if t is None:
            return None
        _torch = t
        _TORCH_FLOAT.update(
            {t.float32: FLOAT32, t.float64: FLOAT64, t.float16: FLOAT16, t.bfloat16: BFLOAT16}
        )
        _TORCH_INT.update({t.int64: INT64, t.int32: INT32})
    return _torch


class Buf:
    """A contiguous array the engine can address (rows = batch, cols = the rest)."""

    __slots__ = (
        "arr",
        "ptr",
        "shape",
        "dtype",
        "device",
        "device_id",
        "kind",
        "keep",
        "rows",
        "cols",
        "numel",
    )

    def __init__(
        self,
        arr: Any,
        ptr: int,
        shape: tuple[int, ...],
        dtype: int,
        device: int,
        device_id: int,
        kind: str,
        keep: Any = None,
    ) -> None:
        self.arr = arr  # the array itself (kept alive for the call)
        self.ptr = ptr
        self.shape = shape
        self.dtype = dtype  # engine dtype code (float) or index code (int)
        self.device = device  # CPU or CUDA
        self.device_id = device_id
        self.kind = kind  # "torch" | "numpy" | "cupy" | "dlpack"
        self.keep = keep  # a DLPack capsule to keep alive
        self.numel = math.prod(shape)
        self.rows = shape[0] if shape else 1
        self.cols = self.numel // self.rows if self.rows else 0

    def rows_cols(self) -> tuple[int, int]:
        return self.rows, self.cols


def _dtype_error(name: str, got: object, integer: bool, device: int) -> TypeError:
    if integer:
        want = "int64 or int32"
    elif device == CUDA:
        want = "float32, float64, float16 or bfloat16"
    else:
        want = "float32 or float64 (float16/bfloat16 are accepted on CUDA only)"
    return TypeError(f"{name} must be {want}, got {got}")


def _from_torch(x: Any, name: str, integer: bool) -> Buf:
    # data_ptr() needs no detach (only __dlpack__ refuses tensors that require grad).
    if not x.is_contiguous():
        x = x.contiguous()
    if x.is_neg():  # a lazily negated view: its memory holds -x
        x = x.resolve_neg()
    code = (_TORCH_INT if integer else _TORCH_FLOAT).get(x.dtype)
    if x.is_cuda:
        device, did = CUDA, x.get_device()
    elif x.is_cpu:
        device, did = CPU, 0
        if code in (FLOAT16, BFLOAT16):
            code = None
    else:
        raise TypeError(f"{name} is on device {x.device}; genloss.native supports cpu and cuda")
    if code is None:
        raise _dtype_error(name, x.dtype, integer, device)
    return Buf(x, x.data_ptr(), tuple(x.shape), code, device, did, "torch")


def _from_numpy(x: np.ndarray, name: str, integer: bool) -> Buf:
    table = _NP_INT if integer else _NP_FLOAT
    code = table.get(x.dtype)
    if code is None:
        raise _dtype_error(name, x.dtype, integer, CPU)
    if not x.flags.c_contiguous:
        x = np.array(x, order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    return Buf(x, x.__array_interface__["data"][0], x.shape, code, CPU, 0, "numpy")


def as_input(x: Any, name: str, *, integer: bool = False) -> Buf:
    """A view of ``x`` for the engine; copies only to make it contiguous."""
    t = _torch_mod()
    if t is not None and isinstance(x, t.Tensor):
        return _from_torch(x, name, integer)
    if isinstance(x, np.ndarray):
        return _from_numpy(x, name, integer)
    if not hasattr(x, "__dlpack__") or not hasattr(x, "__dlpack_device__"):
        raise TypeError(
            f"{name} must be an array with __dlpack__ (NumPy, PyTorch, CuPy, JAX), got {type(x).__name__}"
        )
    dev_type, dev_id = x.__dlpack_device__()
    if int(dev_type) == 1:  # kDLCPU: NumPy reads it without a copy
        return _from_numpy(np.from_dlpack(x), name, integer)
    if int(dev_type) != 2:
        raise TypeError(
            f"{name} is on DLPack device type {int(dev_type)}; genloss.native supports CPU and CUDA"
        )
    # CUDA, not torch: the producer orders its work before the legacy default
    # stream (stream=1 in the DLPack protocol), on which genloss then launches.
    cap = x.__dlpack__(stream=1)
    ptr, code, bits, lanes, _, did, shape, strides = _C.dlpack_info(cap)
    if lanes != 1:
        raise TypeError(f"{name} has vector lanes; genloss needs scalar elements")
    if integer:
        mapped = {(0, 64): INT64, (0, 32): INT32}.get((code, bits))
    else:
        mapped = {(2, 32): FLOAT32, (2, 64): FLOAT64, (2, 16): FLOAT16, (4, 16): BFLOAT16}.get((code, bits))
    if mapped is None:
        raise _dtype_error(name, f"DLPack dtype (code {code}, {bits} bits)", integer, CUDA)
    if strides is not None:
        expect, acc = [], 1
        for n in reversed(shape):
            expect.append(acc)
            acc *= n
        if tuple(reversed(expect)) != tuple(strides) and math.prod(shape) > 1:
            raise ValueError(f"{name} is a non-contiguous CUDA array; pass a contiguous copy")
    kind = "cupy" if type(x).__module__.startswith("cupy") else "dlpack"
    return Buf(x, ptr, tuple(shape), mapped, CUDA, did, kind, keep=cap)


def same_place(ref: Buf, ref_name: str, other: Buf, name: str) -> None:
    """Inputs of one call share a device and a floating dtype."""
    if (other.device, other.device_id) != (ref.device, ref.device_id):
        raise ValueError(f"{name} must be on the device of {ref_name}")
    if other.dtype != ref.dtype:
        raise TypeError(
            f"{name} must have the dtype of {ref_name} ({_DTYPE_NAMES[ref.dtype]}), got {_DTYPE_NAMES[other.dtype]}"
        )


_NP_OF = {FLOAT32: np.float32, FLOAT64: np.float64}

# Fresh CPU torch outputs of at least this many bytes come from genloss's block cache
# (cpp/src/host_cache.cpp: 2 MiB-aligned huge-page blocks, freed blocks reused with
# their pages mapped; GENLOSS_HOST_CACHE_MB bounds the free blocks it keeps, 0 turns
# the reuse off). NumPy outputs only get the huge-page advice.
# GENLOSS_HUGE_PAGES=0 turns both off (plain torch.empty / np.empty).
HOST_CACHE_MIN_BYTES = _C.HOST_CACHE_MIN_BYTES  # 4 MiB, shared with cpp/src/fast_path.cpp
_huge_pages = os.environ.get("GENLOSS_HUGE_PAGES", "1") != "0"


def _torch_cpu_empty(shape: tuple[int, ...], dtype: Any, code: int) -> Any:
    if _huge_pages and code in (FLOAT32, FLOAT64):
        nbytes = math.prod(shape) * (4 if code == FLOAT32 else 8)
        if nbytes >= HOST_CACHE_MIN_BYTES:
            return _torch.from_dlpack(_C.cached_empty(list(shape), code))
    return _torch.empty(shape, dtype=dtype)  # cheaper than new_empty


_ALIGN_MIN_BYTES = 1 << 16  # NumPy outputs from this size on start on a 64-byte boundary


def _numpy_empty(shape: tuple[int, ...], code: int) -> np.ndarray:
    dtype = np.dtype(_NP_OF[code])
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= _ALIGN_MIN_BYTES:
        # np.empty's large blocks sit 16 bytes past a page: start on a cache line, so the
        # engine's streaming stores (64-byte aligned, see streaming_stores) apply
        raw = np.empty(nbytes + 64, dtype=np.uint8)
        off = -raw.__array_interface__["data"][0] % 64
        a = raw[off : off + nbytes].view(dtype).reshape(shape)
    else:
        a = np.empty(shape, dtype=dtype)
    if _huge_pages and a.nbytes >= HOST_CACHE_MIN_BYTES:
        _C.advise_huge_pages(a.__array_interface__["data"][0], a.nbytes)
    return a


def empty_cache() -> None:
    """Free the blocks genloss's CPU output cache keeps for reuse (see HOST_CACHE_MIN_BYTES)."""
    _C.host_cache_clear()


def cache_info() -> dict:
    """Bytes and blocks the CPU output cache holds, its limit, hits and misses."""
    return dict(_C.host_cache_info())


def streaming_stores(min_bytes: int | None = None) -> int:
    """The CPU engine's streaming-store threshold, set to ``min_bytes`` if given.

    A loss kernel (``map_reduce``) whose gradients and elementwise outputs add up to at
    least this many bytes writes them with non-temporal stores: no read-for-ownership of
    the destination lines and no eviction of the caller's caches. A call's results do not
    depend on which of its blocks stream (64-byte aligned ones do). Default 2 MiB
    (environment: ``GENLOSS_STREAM_MIN_BYTES``); a negative value turns streaming off.
    Returns the threshold in force before the call.
    """
    old = int(_C.stream_min_bytes())
    if min_bytes is not None:
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int):
            raise TypeError(f"min_bytes must be an int, got {type(min_bytes).__name__}")
        _C.set_stream_min_bytes(min_bytes)
    return old


def empty(like: Buf, shape: tuple[int, ...], *, fill: float | None = None) -> Buf:
    """A new contiguous array of ``like``'s kind, device and dtype."""
    if like.kind == "torch":  # the input's dtype and device
        if fill is not None:
            a = like.arr.new_full(shape, fill)
        elif like.device == CPU:
            a = _torch_cpu_empty(shape, like.arr.dtype, like.dtype)
        else:
            a = like.arr.new_empty(shape)
        return Buf(a, a.data_ptr(), shape, like.dtype, like.device, like.device_id, "torch")
    if like.device == CPU:
        if fill is None:
            a = _numpy_empty(shape, like.dtype)
        else:
            a = np.full(shape, fill, _NP_OF[like.dtype])
        return Buf(a, a.__array_interface__["data"][0], tuple(shape), like.dtype, CPU, 0, "numpy")
    if like.kind == "cupy":
        import cupy

        names = {FLOAT32: "float32", FLOAT64: "float64", FLOAT16: "float16"}
        if like.dtype not in names:
            raise TypeError("bfloat16 CuPy arrays are not supported; use torch tensors")
        with cupy.cuda.Device(like.device_id):
            a = (
                cupy.empty(shape, dtype=names[like.dtype])
                if fill is None
                else cupy.full(shape, fill, names[like.dtype])
            )
        return Buf(a, a.data.ptr, tuple(shape), like.dtype, CUDA, like.device_id, "cupy")
    raise TypeError("genloss.native allocates CUDA outputs with torch or CuPy; pass one of those")


def broadcast(b: Buf, shape: tuple[int, ...], name: str) -> Buf:
    """``b`` materialised (contiguous) at a broadcast ``shape``; itself if it has it."""
    if b.shape == tuple(shape):
        return b
    if b.kind == "torch":
        a = b.arr.expand(shape).contiguous()
    elif b.kind == "cupy":
        import cupy

        a = cupy.ascontiguousarray(cupy.broadcast_to(b.arr, shape))
    else:
        a = np.ascontiguousarray(np.broadcast_to(b.arr, shape))
    return as_input(a, name)


def sum_to(g: Any, shape: tuple[int, ...], kind: str) -> Any:
    """Backward of broadcasting: ``g`` summed down to ``shape`` (NumPy rules)."""
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g
    extra = len(g.shape) - len(shape)
    lead = tuple(range(extra))
    stretched = tuple(extra + i for i, n in enumerate(shape) if n == 1 and g.shape[extra + i] != 1)
    if kind == "torch":
        if stretched:
            g = g.sum(dim=stretched, keepdim=True)
        if lead:
            g = g.sum(dim=lead)
    else:
        if stretched:
            g = g.sum(axis=stretched, keepdims=True)
        if lead:
            g = g.sum(axis=lead)
    return g.reshape(shape)


def float_range(b: Buf) -> tuple[float, float]:
    """(min, max) of a float array on its own device (CUDA: synchronises)."""
    if b.kind == "torch":
        lo, hi = b.arr.aminmax()
        return float(lo), float(hi)
    return float(b.arr.min()), float(b.arr.max())


def stream_of(b: Buf) -> int:
    if b.device == CPU:
        return 0
    if b.kind == "torch":
        return int(_torch.cuda.current_stream(b.device_id).cuda_stream)
    if b.kind == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    return 0


def _p(b: Buf | None) -> int:
    return 0 if b is None else b.ptr


def map_reduce(
    functor: str,
    x: Buf,
    *,
    y: Buf | None = None,
    more: Sequence[Buf] = (),
    params: tuple[float, float, float] = (0.0, 0.0, 0.0),
    mode: int = 0,
    shape2d: tuple[int, int] | None = None,
    value_scale: float = 1.0,
    out: Buf | None = None,
    rows_out: Buf | None = None,
    elems_out: Buf | None = None,
    accumulate: bool = False,
    grads: Sequence[Buf | None] = (),
    grad_scale: float = 1.0,
    grad_offset: float = 0.0,
    totals: bool = False,
) -> tuple[float, float] | None:
    """Run one functor over ``x`` (, ``y``, ``*more``) viewed as ``shape2d`` (rows, cols).

    ``grads[a]`` receives d f / d input a (None: not written).
    """
    rows, cols = shape2d if shape2d is not None else (x.rows, x.cols)
    ins = [x.ptr] + ([] if y is None else [y.ptr]) + [b.ptr for b in more]
    return _C.map_reduce(
        x.device, x.device_id, stream_of(x), F[functor], params[0], params[1], params[2], mode, x.dtype,
        ins, [_p(g) for g in grads], rows, cols, value_scale, _p(out), int(accumulate), _p(rows_out),
        _p(elems_out), grad_scale, grad_offset, totals,
    )  # fmt: skip


def row_scale(
    x: Buf, out: Buf, *, coef: Buf | None = None, scale: float = 1.0, accumulate: bool = False
) -> None:
    rows, cols = x.rows_cols()
    _C.row_scale(x.device, x.device_id, stream_of(x), x.dtype, x.ptr, _p(coef), out.ptr, rows, cols, scale,
                 int(accumulate))  # fmt: skip


def col_sum(x: Buf, out: Buf, *, scale: float = 1.0) -> None:
    rows, cols = x.rows_cols()
    _C.col_sum(x.device, x.device_id, stream_of(x), x.dtype, x.ptr, out.ptr, rows, cols, scale)


def col_broadcast(v: Buf, out: Buf, *, scale: float = 1.0, accumulate: bool = False) -> None:
    rows, cols = out.rows_cols()
    _C.col_broadcast(v.device, v.device_id, stream_of(v), v.dtype, v.ptr, out.ptr, rows, cols, scale,
                     int(accumulate))  # fmt: skip


def row_lse(
    logits: Buf,
    *,
    mode: int,
    labels: Buf | None = None,
    index: int = 0,
    value_scale: float = 1.0,
    out: Buf | None = None,
    rows_out: Buf | None = None,
    accumulate: bool = False,
    grad: Buf | None = None,
    grad_scale: float = 1.0,
) -> None:
    rows, k = logits.shape
    _C.row_lse(
        logits.device, logits.device_id, stream_of(logits), logits.dtype, logits.ptr, _p(labels),
        labels.dtype if labels is not None else 0, mode, index, rows, k, value_scale, _p(out),
        int(accumulate), _p(rows_out), grad_scale, _p(grad),
    )  # fmt: skip


def check_if_nan(value: Any, check: Any) -> None:
    """For functors that make the value NaN where an input is outside its domain
    (BernoulliNLL's targets, vlb_term's x0): run ``check()``, which reads the input
    again and raises naming it, only when the result has a NaN, instead of a separate
    min/max pass over the input on every call."""
    nan = value.isnan().any() if hasattr(value, "isnan") else np.isnan(value).any()
    if bool(nan):
        check()


def int_range(b: Buf) -> tuple[int, int]:
    """(min, max) of an integer array, on its own device (CUDA: synchronises)."""
    return int(b.arr.min()), int(b.arr.max())
