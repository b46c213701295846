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
import threading
import warnings
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

import numpy as np

from .. import _C

F = _C.FUNCTORS  # functor name -> id, generated from cpp/include/genloss/engine.h
# functor name -> the names of its parameters (ParamNames in cpp/include/genloss/ops/*.h)
FUNCTOR_PARAMS: dict[str, tuple[str, ...]] = _C.FUNCTOR_PARAMS

FLOAT32, FLOAT64, FLOAT16, BFLOAT16 = 0, 1, 2, 3
INT64, INT32 = 0, 1
CPU, CUDA = 0, 1

_NP_FLOAT = {np.dtype(np.float32): FLOAT32, np.dtype(np.float64): FLOAT64, np.dtype(np.float16): FLOAT16}
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
        rec = _local.rec
        if rec is not None:  # a composition being recorded: its arrays live as long as the recording
            rec.keep.append(arr)

    def rows_cols(self) -> tuple[int, int]:
        return self.rows, self.cols


def _op_prefix() -> str:
    """``"op: "`` for the public genloss op that is validating its inputs, found on the
    call stack (only when an error is raised: as_input's callers pass no op name), or
    ``""`` when as_input was called from outside an op. An op is a function that
    genloss.native or genloss.torch exports under its own name."""
    layers = [m for m in (sys.modules.get("genloss.native"), sys.modules.get("genloss.torch")) if m]
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        fn = f.f_code.co_name
        if f.f_globals.get("__name__", "").startswith("genloss.") and not fn.startswith("_"):
            # the exported function, or the function it wraps (_checks.op_errors)
            exported = [getattr(m, fn, None) for m in layers]
            if any(getattr(getattr(e, "__wrapped__", e), "__code__", None) is f.f_code for e in exported):
                return f"{fn}: "
        f = f.f_back
    return ""


def _err(cls: type[Exception], msg: str) -> Exception:
    return cls(_op_prefix() + msg)


def _dtype_error(name: str, got: object, integer: bool, device: int) -> Exception:
    if integer:
        want = "int64 or int32"
    else:
        want = "float32, float64, float16 or bfloat16"
    return _err(TypeError, f"{name} must be {want}, got {got}")


def _phys_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not reported: no bound
        return 1 << 62


_PHYS_BYTES = _phys_bytes()


def check_copy_size(name: str, shape: Sequence[int], itemsize: int, what: str) -> None:
    """Refuse to materialise an array larger than this machine's memory: a broadcast
    (stride-0) view of a few bytes can have a logical size of terabytes, and copying it
    would end in an opaque allocation error (or, in torch, a size overflow)."""
    nbytes = math.prod(shape) * itemsize
    if nbytes > _PHYS_BYTES:
        raise _err(
            ValueError,
            f"{name} is {what} of shape {tuple(shape)} whose contiguous copy would need {nbytes} bytes, "
            f"more than this machine's memory ({_PHYS_BYTES} bytes); pass a smaller or contiguous array",
        )


def cuda_problem(info: dict[str, Any]) -> str:
    """Why the CUDA engine cannot run on this machine ('' when it can), from ``_C.cuda_runtime()``.

    genloss links the CUDA runtime statically: a CUDA 13 build needs a driver for CUDA 13
    (NVIDIA driver >= 580) even where torch's own cu12x wheels run on an older one, so the
    driver is checked by major version (CUDA's minor-version compatibility covers the rest).
    """
    if not info["built"]:
        return (
            "genloss was built without CUDA (nvcc was not found at build time, or GENLOSS_CUDA=OFF): "
            "reinstall where nvcc is found to pass CUDA arrays"
        )

    def ver(v: int) -> str:
        return f"{v // 1000}.{v % 1000 // 10}"

    rt, drv = int(info["runtime_version"]), int(info["driver_version"])
    if drv == 0:
        return "genloss's CUDA engine found no NVIDIA driver"
    if drv // 1000 < rt // 1000:
        return (
            f"genloss's CUDA engine was built with the CUDA {ver(rt)} runtime, which needs a driver for "
            f"CUDA {rt // 1000}.x; the installed driver supports CUDA {ver(drv)}: update the NVIDIA driver, "
            f"or rebuild genloss with a CUDA {drv // 1000}.x toolkit (e.g. the one of your torch build)"
        )
    if info["error"]:
        return f"genloss's CUDA engine cannot start: the CUDA runtime says '{info['error']}'"
    if int(info["device_count"]) < 1:
        return "genloss's CUDA engine sees no CUDA device"
    return ""


_CUDA_PROBLEM: list[str] = []  # filled by the first CUDA input: the probe runs once


def _require_cuda(name: str) -> None:
    """A CUDA input is refused, naming it and saying why, when the CUDA engine cannot run."""
    if not _CUDA_PROBLEM:
        _CUDA_PROBLEM.append(cuda_problem(_C.cuda_runtime()))
    if _CUDA_PROBLEM[0]:
        raise _err(RuntimeError, f"{name} is a CUDA array, but {_CUDA_PROBLEM[0]}")


def not_dense(x: Any) -> str:
    """What a torch tensor the kernels cannot read is ('a nested tensor', 'layout torch.sparse_coo'), or ''."""
    if x.is_nested:
        return "a nested tensor"
    return "" if x.layout == _torch_mod().strided else f"layout {x.layout}"


def _from_torch(x: Any, name: str, integer: bool) -> Buf:
    # data_ptr() needs no detach (only __dlpack__ refuses tensors that require grad).
    if not x.is_contiguous():
        check_copy_size(name, x.shape, x.element_size(), "a non-contiguous tensor")
        x = x.contiguous()
    elif x.data_ptr() % x.element_size():
        # not aligned to its element size (torch.frombuffer at an odd offset): the engine's
        # typed loads would be undefined behaviour, so it reads an aligned copy
        x = x.clone()
    if x.is_neg():  # a lazily negated view: its memory holds -x
        x = x.resolve_neg()
    code = (_TORCH_INT if integer else _TORCH_FLOAT).get(x.dtype)
    if x.is_cuda:
        _require_cuda(name)
        device, did = CUDA, x.get_device()
    elif x.is_cpu:
        device, did = CPU, 0
    else:
        raise _err(TypeError, f"{name} is on device {x.device}; genloss.native supports cpu and cuda")
    if code is None:
        raise _dtype_error(name, x.dtype, integer, device)
    return Buf(x, x.data_ptr(), tuple(x.shape), code, device, did, "torch")


def _from_numpy(x: np.ndarray, name: str, integer: bool) -> Buf:
    table = _NP_INT if integer else _NP_FLOAT
    code = table.get(x.dtype)
    if code is None:
        raise _dtype_error(name, x.dtype, integer, CPU)
    if not x.flags.c_contiguous:
        check_copy_size(name, x.shape, x.itemsize, "a non-contiguous array")
        x = np.array(x, order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    elif not x.flags.aligned:
        # a view at an offset that is not a multiple of the itemsize (e.g. float64 at
        # byte 1 of a uint8 buffer): the engine's typed loads would be undefined
        # behaviour, so it reads an aligned copy (np.array allocates aligned)
        x = np.array(x, order="C")
    return Buf(x, x.__array_interface__["data"][0], x.shape, code, CPU, 0, "numpy")


class _Capsule:
    """An already validated capsule, handed to np.from_dlpack (which calls __dlpack__)."""

    def __init__(self, cap: Any) -> None:
        self.cap = cap

    def __dlpack__(self, **_: Any) -> Any:
        return self.cap

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)


def _dlpack_device(x: Any, name: str) -> tuple[int, int]:
    try:
        dev_type, dev_id = x.__dlpack_device__()
        return int(dev_type), int(dev_id)
    except (TypeError, ValueError) as e:
        raise _err(
            TypeError, f"{name}.__dlpack_device__() must return (device_type, device_id), got an error: {e}"
        ) from e


def as_input(x: Any, name: str, *, integer: bool = False) -> Buf:
    """A view of ``x`` for the engine; copies only to make it contiguous (or aligned)."""
    t = _torch_mod()
    if t is not None and isinstance(x, t.Tensor):
        try:
            return _from_torch(x, name, integer)
        except RuntimeError:  # a sparse or nested tensor: torch's "unsupported memory format", "sizes"
            kind = not_dense(x)
            if kind:
                raise _err(TypeError, f"{name} must be a dense (strided) tensor, got {kind}") from None
            raise
    if isinstance(x, np.ndarray):
        return _from_numpy(x, name, integer)
    if not hasattr(x, "__dlpack__") or not hasattr(x, "__dlpack_device__"):
        raise _err(
            TypeError,
            f"{name} must be an array with __dlpack__ (NumPy, PyTorch, CuPy, JAX), got {type(x).__name__}",
        )
    dev_type, dev_id = _dlpack_device(x, name)
    if dev_type not in (1, 2):
        raise _err(
            TypeError, f"{name} is on DLPack device type {dev_type}; genloss.native supports CPU and CUDA"
        )
    # CUDA, not torch (the DLPack stream protocol): the launch stream is picked first
    # (_launch_stream: CuPy's current stream on the ARRAY's device, else the legacy
    # default stream) and handed to the producer, which orders its pending work before it.
    kind = "cupy" if type(x).__module__.startswith("cupy") else "dlpack"
    if dev_type == 1:
        cap = x.__dlpack__()
    else:
        launch = _launch_stream(kind, dev_id)
        cap = x.__dlpack__(stream=launch if launch else 1)  # DLPack: 1 = legacy default (handle 0)
    try:
        ptr, code, bits, lanes, cap_dev, did, shape, strides = _C.dlpack_info(cap, name)
    except (TypeError, ValueError) as e:
        raise _err(type(e), str(e)) from None
    if cap_dev != dev_type:
        raise _err(
            ValueError,
            f"{name}: __dlpack__ gave a capsule on device type {cap_dev}, __dlpack_device__ said {dev_type}",
        )
    if dev_type == 1:  # kDLCPU: NumPy reads the checked capsule without a copy
        try:
            arr = np.from_dlpack(_Capsule(cap))
        except (TypeError, ValueError, BufferError, RuntimeError) as e:
            raise _err(TypeError, f"{name}: NumPy cannot read its DLPack capsule: {e}") from e
        return _from_numpy(arr, name, integer)
    _require_cuda(name)  # after the capsule's checks: a malformed capsule is refused as such anywhere
    if lanes != 1:
        raise _err(TypeError, f"{name} has vector lanes; genloss needs scalar elements")
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
            raise _err(ValueError, f"{name} is a non-contiguous CUDA array; pass a contiguous copy")
    if ptr % (bits // 8):
        raise _err(
            ValueError, f"{name}'s data is not aligned to its {bits // 8}-byte elements; pass an aligned copy"
        )
    return Buf(x, ptr, tuple(shape), mapped, CUDA, did, kind, keep=cap)


def same_place(ref: Buf, ref_name: str, other: Buf, name: str) -> None:
    """Inputs of one call share a device and a floating dtype."""
    if (other.device, other.device_id) != (ref.device, ref.device_id):
        raise ValueError(f"{name} must be on the device of {ref_name}")
    if other.dtype != ref.dtype:
        raise TypeError(
            f"{name} must have the dtype of {ref_name} ({_DTYPE_NAMES[ref.dtype]}), got {_DTYPE_NAMES[other.dtype]}"
        )


_NP_OF = {FLOAT32: np.float32, FLOAT64: np.float64, FLOAT16: np.float16}

# Fresh CPU torch outputs of at least this many bytes come from genloss's block cache
# (cpp/src/host_cache.cpp: 2 MiB-aligned huge-page blocks, freed blocks reused with
# their pages mapped; options(host_cache_mb=...) bounds the free blocks it keeps, 0 turns
# the reuse off). NumPy outputs only get the huge-page advice.
# options(huge_pages=False) turns both off (plain torch.empty / np.empty).
HOST_CACHE_MIN_BYTES = _C.HOST_CACHE_MIN_BYTES  # 4 MiB, shared with cpp/src/plan.cpp

# ---- runtime configuration: one room (cpp/src/config.cpp reads the environment) ------

for _msg in _C.config_warnings():  # an environment variable that did not parse
    warnings.warn(f"genloss: {_msg}", RuntimeWarning, stacklevel=2)

_huge_pages = bool(_C.config()["huge_pages"])  # read per allocation: a plain bool
_check_data = True  # options(check_data=...): read per call, a plain bool


def _settable(c: Any) -> dict:
    """The settable values of a ``_C.config()`` dict, as options() takes them."""
    return {
        "huge_pages": bool(c["huge_pages"]),
        "host_cache_mb": None if c["host_cache_mb"] < 0 else int(c["host_cache_mb"]),
        "stream_min_bytes": int(c["stream_min_bytes"]),
        "nt_stores": bool(c["nt_stores"]),
    }


def _settings() -> dict:
    """The settings as options() reports them."""
    c = _C.config()
    return {
        **_settable(c),
        "check_data": _check_data,
        "threads": int(c["threads"]),
        "isa": {"running": c["isa"], "forced": c["isa_forced"] or None},
    }


def _raw() -> dict:
    """The settable values as stored (threads: None for OpenMP's default), to restore."""
    c = _C.config()
    return {**_settable(c), "threads": int(c["threads_setting"]) or None, "check_data": _check_data}


def _want_int(name: str, v: Any, *, lo: int | None, none_ok: bool) -> None:
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        want = "an int or None" if none_ok else "an int"
        raise TypeError(f"options: {name} must be {want}, got {type(v).__name__}")
    if lo is not None and v < lo:
        raise ValueError(f"options: {name} must be >= {lo}, got {v}")
    if not -(2**62) <= v < 2**62:
        raise ValueError(f"options: {name} is out of range, got {v}")


def _want_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"options: {name} must be a bool, got {type(v).__name__}")


def _validate(kw: dict) -> None:
    for name, v in kw.items():
        if name in ("huge_pages", "nt_stores", "check_data"):
            _want_bool(name, v)
        elif name == "host_cache_mb":
            _want_int(name, v, lo=0, none_ok=True)
        elif name == "stream_min_bytes":
            _want_int(name, v, lo=None, none_ok=False)
        elif name == "threads":
            _want_int(name, v, lo=1, none_ok=True)
        elif name == "isa":
            now = _settings()["isa"]
            if v != now and v != now["running"]:
                raise ValueError(
                    f"options: isa is read-only (running {now['running']}); set GENLOSS_ISA="
                    "sse2|avx2|avx512 in the environment before genloss is imported"
                )
        else:
            known = ", ".join(sorted((*_raw(), "isa")))
            raise TypeError(f"options: unknown option {name!r} (known: {known})")


def _apply(kw: dict) -> None:
    global _huge_pages, _check_data
    for name, v in kw.items():
        if name == "check_data":
            _check_data = v
        elif name == "huge_pages":
            _C.set_huge_pages(v)
            _huge_pages = v
        elif name == "host_cache_mb":
            _C.set_host_cache_mb(-1 if v is None else v)
        elif name == "stream_min_bytes":
            _C.set_stream_min_bytes(v)
        elif name == "nt_stores":
            _C.set_nt_stores(v)
        elif name == "threads":
            _C.set_threads(0 if v is None else v)


class Options(dict):
    """The settings in force (a dict); as a context manager, restores on exit the
    values that its ``options(...)`` call changed."""

    def __init__(self, current: dict, previous: dict) -> None:
        super().__init__(current)
        self._previous = previous

    def __enter__(self) -> Options:
        return self

    def __exit__(self, *exc: object) -> None:
        _apply(self._previous)


def options(**kw: Any) -> Options:
    """The engine's runtime settings: returns them (a dict) after setting those passed.

    Also a context manager: ``with genloss.native.options(stream_min_bytes=-1): ...``
    restores the previous values on exit. Settings are process-wide (every thread).

    huge_pages : bool
        Large CPU outputs (>= 4 MiB) from the huge-page block cache (torch) or with
        huge-page advice (NumPy); False: plain ``torch.empty`` / ``np.empty``.
        Environment: ``GENLOSS_HUGE_PAGES=0``.
    host_cache_mb : int >= 0 or None
        Bound on the free blocks the output cache keeps (0: no reuse). None (default):
        sized by use, the most bytes of cached outputs alive at once in recent calls,
        at most min(physical memory / 8, 4 GiB). Environment: ``GENLOSS_HOST_CACHE_MB``.
    stream_min_bytes : int
        A loss kernel whose gradients and elementwise outputs add up to at least this
        many bytes writes them with non-temporal (streaming) stores where 64-byte
        aligned; < 0: never. Default 2 MiB. Environment: ``GENLOSS_STREAM_MIN_BYTES``.
    nt_stores : bool
        False: above the threshold, plain stores instead (the same loop; comparisons).
    check_data : bool
        True (default): the checks that read input VALUES (timesteps in range, Bernoulli
        targets in [0, 1], finite per-sample weights, ...) run on every call and raise a
        ValueError naming the argument. On CUDA each one waits for the GPU (a read-back):
        False skips them on CUDA, as ``torch.distributions``' ``validate_args=False`` does:
        an invalid value then gives NaN (an out-of-range timestep: that row's value and
        gradients), a wrong result (VQ's EMA update: an out-of-range index's row counts
        for no code), or where a torch fallback indexes with it a CUDA device-side
        assert, instead of a ValueError naming it. CPU data is
        always checked (no wait there); shapes, dtypes and hyperparameters always. Under
        CUDA graph capture the value checks are skipped whatever this says (nothing may be
        read back then). Also read by ``genloss.torch``.
    threads : int >= 1 or None
        OpenMP threads of the engine's parallel loops; None: OpenMP's default
        (``OMP_NUM_THREADS`` or the cores). Reported as the count in use.
        Environment: ``GENLOSS_NUM_THREADS``. In a child forked from a process that
        loaded genloss (``os.fork``, multiprocessing's 'fork' start method) it starts
        at 1, and the thread that forked stays at 1 whatever the setting: GNU OpenMP
        leaves that thread a pool whose workers fork did not copy, and a team of one
        never touches it (cpp/src/config.cpp). Threads the child starts build a fresh
        pool and use the setting.
    isa : read only
        ``{"running": "sse2"|"avx2"|"avx512", "forced": GENLOSS_ISA or None}``.

    Streaming or not, and the thread count, never change a bit of a result; calls
    below the threshold run a second loop that agrees bit for bit except, in the last
    bit, where an exp/log1p is vectorised in one loop and not the other.
    """
    _validate(kw)
    kw = {k: v for k, v in kw.items() if k != "isa"}
    before = _raw()
    previous = {k: before[k] for k in kw}
    _apply(kw)
    return Options(_settings(), previous)


_ITEM_BYTES = {FLOAT32: 4, FLOAT64: 8, FLOAT16: 2, BFLOAT16: 2}


def _torch_cpu_empty(shape: tuple[int, ...], dtype: Any) -> Any:
    """A CPU tensor of torch dtype ``dtype``: float outputs of HOST_CACHE_MIN_BYTES or more
    from the output cache (16-bit ones too: a fresh 8 MiB bfloat16 gradient page-faults on
    every call, a cached one is reused)."""
    code = _TORCH_FLOAT.get(dtype)  # (integer codes share 0/1 with float32/float64)
    if _huge_pages and code is not None:
        nbytes = math.prod(shape) * _ITEM_BYTES[code]
        if nbytes >= HOST_CACHE_MIN_BYTES:
            return _torch.from_dlpack(_C.cached_empty(list(shape), code))
    return _torch.empty(shape, dtype=dtype)  # cheaper than new_empty


_ALIGN_MIN_BYTES = 1 << 16  # NumPy outputs from this size on start on a 64-byte boundary


def _numpy_empty(shape: tuple[int, ...], code: int) -> np.ndarray:
    dtype = np.dtype(_NP_OF[code])
    nbytes = math.prod(shape) * dtype.itemsize
    if _huge_pages and nbytes >= HOST_CACHE_MIN_BYTES:  # as torch outputs: a reused block
        return _C.cached_empty_numpy(list(shape), code)
    if nbytes >= _ALIGN_MIN_BYTES:
        # np.empty's large blocks sit 16 bytes past a page: start on a cache line, so the
        # engine's streaming stores (64-byte aligned, see options(stream_min_bytes)) apply
        raw = np.empty(nbytes + 64, dtype=np.uint8)
        off = -raw.__array_interface__["data"][0] % 64
        a = raw[off : off + nbytes].view(dtype).reshape(shape)
    else:
        a = np.empty(shape, dtype=dtype)
    return a


def empty_cache() -> None:
    """Free the blocks genloss's CPU output cache keeps for reuse (see HOST_CACHE_MIN_BYTES)."""
    _C.host_cache_clear()


def cache_info() -> dict:
    """Bytes and blocks the CPU output cache holds, its limit, hits and misses."""
    return dict(_C.host_cache_info())


def empty(
    like: Buf, shape: tuple[int, ...], *, fill: float | None = None, f32: bool = False, f64: bool = False
) -> Buf:
    """A new contiguous array of ``like``'s kind, device and dtype (``f32``/``f64``: float32 or
    float64 instead: a 16-bit call's float32 value, a per-row float64 table)."""
    if (f32 or f64) and like.dtype != (FLOAT32 if f32 else FLOAT64):
        return _empty_of(like, shape, FLOAT32 if f32 else FLOAT64)
    if fill is not None:
        data_used()  # a recorded plan allocates its outputs uninitialised
    if like.kind == "torch":  # the input's dtype and device
        if fill is not None:
            a = like.arr.new_full(shape, fill)
        elif like.device == CPU:
            a = _torch_cpu_empty(shape, like.arr.dtype)
        else:
            a = like.arr.new_empty(shape)
        rec = _local.rec
        if rec is not None:  # an output or a scratch of the plan (PlanCache.add tells which)
            rec.allocs.append(a)
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


def _empty_of(like: Buf, shape: tuple[int, ...], dtype: int) -> Buf:
    """A float32 or float64 array where ``like`` is."""
    name = "float32" if dtype == FLOAT32 else "float64"
    if like.kind == "torch":
        if like.device == CPU:
            a = _torch_cpu_empty(shape, getattr(_torch, name))
        else:
            a = _torch.empty(shape, dtype=getattr(_torch, name), device=like.arr.device)
        rec = _local.rec
        if rec is not None:
            rec.allocs.append(a)
        return Buf(a, a.data_ptr(), shape, dtype, like.device, like.device_id, "torch")
    if like.device == CPU:
        n = np.empty(shape, name)
        return Buf(n, n.__array_interface__["data"][0], tuple(shape), dtype, CPU, 0, "numpy")
    arr, addr = device_empty(like, shape, name)
    return Buf(arr, addr, tuple(shape), dtype, CUDA, like.device_id, like.kind)


LOW = (FLOAT16, BFLOAT16)


def value_f32(x: Buf, *outs: Buf | None) -> bool:
    """Whether a call on ``x`` writes float32 value outputs (``outs``: its value buffers): a
    float16/bfloat16 call whose value buffer ``value_out`` made float32 (``float32_values``).
    Raises TypeError for a value buffer of any other dtype than x's and float32."""
    if x.dtype not in LOW:
        return False
    f32 = False
    for o in outs:
        if o is not None and o.dtype != x.dtype:
            if o.dtype != FLOAT32:
                raise TypeError(
                    f"a {_DTYPE_NAMES[x.dtype]} call cannot write a {_DTYPE_NAMES[o.dtype]} value"
                )
            f32 = True
    return f32


def same_dtype_outputs(kind: str, x: Buf, *outs: Buf | None) -> None:
    """The kernels other than map_reduce write their value outputs in the inputs' dtype only:
    a float32 value buffer for a float16/bfloat16 call (``float32_values``) is refused (the
    caller, genloss.torch, then computes the op in float32) instead of written in 16 bits."""
    for o in outs:
        if o is not None and o.dtype != x.dtype:
            raise TypeError(
                f"{kind} writes its value in the inputs' dtype ({_DTYPE_NAMES[x.dtype]}), not {_DTYPE_NAMES[o.dtype]}"
            )


def zeros64(like: Buf, n: int) -> Buf:
    """``n`` float64 zeros where ``like`` is: scalars that one engine call leaves for the next
    (``map_reduce``'s ``totals_out``, ``param_from``, ``offset_from``)."""
    data_used()
    if like.device == CPU:  # (NumPy whatever the input's kind: the cheapest host allocation)
        z = np.zeros(n)
        return Buf(z, z.__array_interface__["data"][0], (n,), FLOAT64, CPU, 0, "numpy")
    if like.kind == "torch":
        a = like.arr.new_zeros((n,), dtype=_torch.float64)
        return Buf(a, a.data_ptr(), (n,), FLOAT64, like.device, like.device_id, "torch")
    if like.kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device_id):
            c = cupy.zeros(n)
        return Buf(c, c.data.ptr, (n,), FLOAT64, CUDA, like.device_id, "cupy")
    raise TypeError("genloss.native allocates CUDA outputs with torch or CuPy; pass one of those")


def device_empty(like: Buf, shape: tuple[int, ...], dtype: str) -> tuple[Any, int]:
    """An uninitialised array of ``dtype`` ("float64", "int64", ...) on ``like``'s CUDA device,
    of its kind (torch or CuPy), and its address: the outputs of a CUDA kernel whose dtype is
    not the input's (indices, counts, float64 radii)."""
    if like.kind == "torch":
        t = like.arr.new_empty(shape, dtype=getattr(_torch, dtype))
        return t, t.data_ptr()
    if like.kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device_id):
            c = cupy.empty(shape, dtype=dtype)
        return c, c.data.ptr
    raise TypeError("genloss.native allocates CUDA outputs with torch or CuPy; pass one of those")


def to_host(a: Any) -> np.ndarray:
    """An array's values in NumPy: a torch tensor or a CuPy array copied to the host (from CUDA:
    a read-back, which waits for the device), a NumPy array as it is. A composition being
    recorded that reads values this way gets no plan (a plan would skip what it checks)."""
    data_used()
    return _host(a)


def _host(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


def checked_values(bufs: Sequence[Buf], replay: tuple) -> list[np.ndarray] | None:
    """The values of ``bufs`` on the host, for a check that a plan repeats as ``replay``
    (``guard``'s arguments), or None when ``skip_checks`` (as ``float_range``)."""
    _checked(replay)
    if skip_checks(bufs[0]):
        return None
    return [_host(b.arr) for b in bufs]


def trailing_cols(small: tuple[int, ...], shape: tuple[int, ...]) -> int | None:
    """The block length when ``small`` broadcast to ``shape`` repeats one contiguous block:
    ``small`` is ``shape``'s last dims after any leading 1s (a scalar: a block of 1), so the
    broadcast array is (rows, cols) with every row ``small``; None for any other broadcast (an
    inner dim stretched, as (B, 1) to (B, F))."""
    s = tuple(small)
    while s and s[0] == 1:
        s = s[1:]
    if len(s) > len(shape) or tuple(shape[len(shape) - len(s) :]) != s:
        return None
    return math.prod(s)


def leading_rows(small: tuple[int, ...], shape: tuple[int, ...]) -> int | None:
    """The row count when ``small`` broadcast to ``shape`` repeats each of its entries over one
    contiguous block: ``small`` (right-aligned) is ``shape``'s first k dims then 1s, as (B, 1) or
    (B, 1, 1) over (B, C, H), so the broadcast array is (rows, cols) with row r all ``small``'s
    entry r; None otherwise."""
    n = len(shape)
    if len(small) > n:
        return None
    s = (1,) * (n - len(small)) + tuple(small)
    k = n
    while k > 0 and s[k - 1] == 1 and shape[k - 1] != 1:
        k -= 1
    if k == 0 or s[:k] != tuple(shape[:k]) or any(d != 1 for d in s[k:]):
        return None
    return math.prod(shape[:k])


def _as_2d(b: Buf, rows: int, cols: int) -> Buf:
    """``b`` addressed as (rows, cols) (the same contiguous data)."""
    return Buf(b.arr, b.ptr, (rows, cols), b.dtype, b.device, b.device_id, b.kind, b.keep)


def broadcast(b: Buf, shape: tuple[int, ...], name: str) -> Buf:
    """``b`` materialised (contiguous) at a broadcast ``shape``; itself if it has it. A trailing
    broadcast (a per-feature or scalar log-variance: col_broadcast) and a leading one (a
    per-sample value, (B, 1) over (B, F): row_scale of ones) are written by the engine into an
    array ``empty`` allocates, so a composition using them can still run on a cached plan; any
    other broadcast is a derived array (no plan)."""
    if b.shape == tuple(shape):
        return b
    check_copy_size(name, shape, b.arr.itemsize, "broadcast to a shape")
    cols = trailing_cols(b.shape, tuple(shape))
    if cols:  # (the callers broadcast floating arrays only)
        out = empty(b, tuple(shape))
        col_broadcast(b, _as_2d(out, out.numel // cols, cols))
        return out
    rows = leading_rows(b.shape, tuple(shape))
    if rows:  # a per-sample value over the sample's elements: row_scale of ones
        out = empty(b, tuple(shape))
        row_scale(None, _as_2d(out, rows, out.numel // rows), coef=b)
        return out
    if b.kind == "torch":
        a = b.arr.expand(shape).contiguous()
    elif b.kind == "cupy":
        import cupy

        a = cupy.ascontiguousarray(cupy.broadcast_to(b.arr, shape))
    else:
        a = np.ascontiguousarray(np.broadcast_to(b.arr, shape))
    return as_input(a, name)


def reduce_to(g: Buf, shape: tuple[int, ...]) -> Any:
    """The backward of ``broadcast``: ``g`` summed down to ``shape``; a trailing broadcast's
    (col_sum: float64 sums in row order) and a leading one's (per-row sums: float64, in order) by
    the engine into an array ``empty`` allocates (a cached plan can replay it), any other by
    ``sum_to``."""
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g.arr
    cols = trailing_cols(shape, tuple(g.shape))
    if cols:
        out = empty(g, shape)
        col_sum(_as_2d(g, g.numel // cols, cols), out)
        return out.arr
    rows = leading_rows(shape, tuple(g.shape))
    if rows:  # each row's sum (float64, in order)
        out = empty(g, shape)
        map_reduce("Linear", _as_2d(g, rows, g.numel // rows), params={}, rows_out=out)
        return out.arr
    return sum_to(g.arr, shape, g.kind)


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


def capturing(b: Buf) -> bool:
    """True while CUDA graph capture runs on the current stream (torch CUDA arrays): nothing
    may read device data back to the host then."""
    return b.device != CPU and b.kind == "torch" and bool(_torch.cuda.is_current_stream_capturing())


def refuse_capture(b: Buf, op: str, why: str) -> None:
    """ValueError under CUDA graph capture for an op whose result needs device data read back on
    the host (``why`` says which, and what to do instead), before anything runs: a read-back
    inside capture would fail in the CUDA runtime and invalidate the whole capture."""
    if capturing(b):
        raise ValueError(f"{op}: {why}, which CUDA graph capture forbids")


def skip_checks(b: Buf) -> bool:
    """Whether the checks of the data of CUDA array ``b`` (``float_range``, ``int_range``,
    ``check_if_nan``: they then return None), each a wait for the GPU, are skipped:
    ``options(check_data=False)``, or CUDA graph capture (``capturing``; the eager warm-up call
    that capture needs runs them on the same static buffers, and a replay runs no Python, so
    the data of a replay is not checked). CPU data is always checked (no wait there)."""
    return b.device != CPU and (not _check_data or capturing(b))


def float_range(b: Buf, replay: tuple | None = None) -> tuple[float, float] | None:
    """(min, max) of a float array on its own device (CUDA: synchronises), or None when
    ``skip_checks``. ``replay``: the guard (``guard``'s arguments) that repeats the
    caller's check of them in a plan."""
    _checked(replay)
    if skip_checks(b):
        return None
    return _min_max(b, float)


def _min_max(b: Buf, cast: Any) -> tuple:
    """(min, max); a torch tensor's by aminmax, on CUDA with ONE read-back (one two-element copy)."""
    if b.kind == "torch":
        lo, hi = b.arr.aminmax()
        if b.device != CPU:
            lo, hi = _torch.stack((lo, hi)).tolist()
        return cast(lo), cast(hi)
    return cast(b.arr.min()), cast(b.arr.max())


def stream_of(b: Buf) -> int:
    if b.device == CPU:
        return 0
    if b.kind == "torch":
        return int(_torch.cuda.current_stream(b.device_id).cuda_stream)
    return _launch_stream(b.kind, b.device_id)


def _launch_stream(kind: str, device_id: int) -> int:
    """The stream a non-torch CUDA input is launched on (and exported for): CuPy's current
    stream on the array's own device (not on the current device), else the legacy default
    stream (handle 0). Known gap: inputs of one call from different producers (CuPy with
    JAX) are each exported for their own kind's stream while the call launches on the first
    input's, so such a mix is not ordered."""
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(device_id):
            return int(cupy.cuda.get_current_stream().ptr)
    return 0


def _p(b: Buf | None) -> int:
    return 0 if b is None else b.ptr


# ---- CUDA scratch: a workspace from the inputs' own allocator (issue 16, item 5) --------
#
# A CUDA kernel that needs scratch (map_reduce's partial sums, row_lse's and gmm's per-row
# values, col_sum's row-slice partials) takes it from a uint8 workspace allocated for the
# call by the library the inputs came from, never by a cudaMalloc of its own: run_call,
# given ``workspace=alloc``, asks the kind's size function (engine.cu) for the bytes,
# calls ``alloc(device_id, nbytes) -> (address, owner)`` before the launch and drops the
# owner after it. torch.empty takes the bytes from torch's caching allocator on the
# current stream (the launch stream; during CUDA graph capture, from the graph's private
# pool), so a call does not fail with "out of memory" while torch holds free cached
# blocks, and nothing is returned to the driver at a sync; freeing right after the
# launch is safe because that allocator hands the bytes out again only to work queued
# later on the same stream. CuPy's pool is stream-ordered the same way. Other DLPack
# producers pass no allocator: the engine then falls back to cudaMallocAsync
# (_C.cuda_scratch_fallbacks() counts those).


def _torch_workspace(device_id: int, nbytes: int) -> tuple[int, Any]:
    t = _torch.empty(nbytes, dtype=_torch.uint8, device=_torch.device("cuda", device_id))
    return t.data_ptr(), t


def _cupy_workspace(device_id: int, nbytes: int) -> tuple[int, Any]:
    import cupy

    with cupy.cuda.Device(device_id):
        a = cupy.empty(nbytes, dtype=cupy.uint8)
    return int(a.data.ptr), a


_WORKSPACE = {"torch": _torch_workspace, "cupy": _cupy_workspace}
_NO_FIELDS: dict[str, Any] = {}  # never mutated: ** of it passes nothing


def workspace(b: Buf) -> dict[str, Any]:
    """The ``workspace=`` field of a call on ``b``'s device: the allocator of ``b``'s library
    on CUDA (none for another producer), nothing at all on the CPU (its hot path pays no
    keyword)."""
    if b.device == CPU:
        return _NO_FIELDS
    alloc = _WORKSPACE.get(b.kind)
    return _NO_FIELDS if alloc is None else {"workspace": alloc}


# ---- the one execution path of the engine: a typed Call, run by _C.run --------------
#
# While a composition records its plan (_compose.cached), every Call it runs is appended
# to this thread's recording, and every array it allocates too (its outputs and scratch);
# anything that reads the DATA on the Python side (a range check, a total that feeds the
# next call) marks the recording as not replayable, so a plan is only ever a function of
# (key, dtype, shapes). A check of the data that the plan cache can re-run itself
# (cpp/src/plan.cpp, GuardKind) is recorded as a guard instead: the plan runs it on every
# call and declines when it fails.


class _Local(threading.local):
    rec: Recording | None = None  # a class default: a thread that never set it reads None, no exception
    f32_values: bool = False  # float32_values() is active on this thread


_local = _Local()


class float32_values:
    """Within it, on this thread, a float16/bfloat16 op returns its value (the loss, or the
    per-sample losses) in float32 where it can: ``value_out`` allocates float32 and the
    elementwise engine writes it so (``MapReduceArgs::value_f32``); gradients stay in the
    inputs' dtype. An op whose value comes from another kernel raises a TypeError instead
    (``same_dtype_outputs``). genloss.torch's bfloat16 pass-through runs ops in it."""

    def __enter__(self) -> None:
        self.prev = _local.f32_values
        _local.f32_values = True

    def __exit__(self, *exc: object) -> None:
        _local.f32_values = self.prev


class Recording:
    """The Calls one composition ran, and whether they alone make its result.

    ``allocs``: the torch arrays it allocated (``empty``), its outputs and its scratch;
    ``keep``: every array it made a Buf of. Both are held until the plan is recorded: a
    plan names buffers by address, and an address only names one buffer while that buffer
    is alive (a freed scratch or copy whose address a later output reused would otherwise
    look like that output; cpp/src/plan.cpp, PlanCache.add)."""

    __slots__ = ("calls", "guards", "ok", "allocs", "keep")

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.guards: list[tuple[str, tuple[int, ...], float]] = []
        self.ok = True
        self.allocs: list[Any] = []
        self.keep: list[Any] = []

    def __enter__(self) -> Recording:
        _local.rec = self
        return self

    def __exit__(self, *exc: object) -> None:
        _local.rec = None


def recording() -> bool:
    """Whether a composition is being recorded for a plan (in this thread)."""
    return _local.rec is not None


def data_used() -> None:
    """The composition being recorded (if any) read its inputs' values in Python: no plan."""
    rec = _local.rec
    if rec is not None:
        rec.ok = False


def guard(kind: str, bufs: Sequence[Buf], arg: float = 0.0) -> None:
    """The composition being recorded (if any) checked the data of ``bufs`` in Python in a way
    its plan can re-run on every call (cpp/src/plan.cpp, GuardKind): 'index_range' (an integer
    input in [0, arg)), 'rows_finite' (the rows of a float64 table input that an integer input
    picks are finite), 'finite' (a float input is finite; arg != 0: and >= 0), 'unit_interval'
    (a float input in [arg, 1], arg >= 0), 'positive' (a float input in (0, arg]), 'within'
    (a float input in [-arg, arg]), 'bounded' (a float input in [0, arg]), 'ordered' (two
    float inputs x, y of one dtype and size: 0 <= x < y entry by entry), 'no_nan' (an output
    has no NaN) and 'rows_normal' (a scratch array has no +inf and nothing below arg), both
    checked after the calls. A
    guard may decline more than the Python check refuses (that call then takes the Python
    path), never less. The plan declines when one fails, and the Python path runs, raises and
    names the argument."""
    rec = _local.rec
    if rec is not None:
        rec.guards.append((kind, tuple(b.ptr for b in bufs), float(arg)))


def _checked(replay: tuple | None) -> None:
    """A check of the data: replayable as ``replay`` (guard's arguments), or no plan."""
    if replay is None:
        data_used()
    else:
        guard(*replay)


run_call = _C.run_call  # run_call(**fields) -> Call: builds a _C.Call and runs it, in one C call


def ran(call: Any) -> Any:
    """``call`` (a ``_C.Call`` that ``run_call`` just ran), noted in this thread's recording.
    Every engine Call of a composition goes ``ran(run_call(...))``: THE entry point of
    map_reduce (the GIL released while it runs)."""
    rec = _local.rec
    if rec is not None:
        rec.calls.append(call)
    return call


_SLOTS = ("a", "b", "c", "mode")


def _positional_params(functor: str, params: Sequence[float], mode: int) -> dict[str, float]:
    """The positional form ``params=(a, b, c), mode=m`` of callers written before named
    parameters, by the functor's slots; a nonzero value in a slot it does not use is an error."""
    slots = _C.FUNCTOR_SLOTS[functor]
    named: dict[str, float] = {}
    for q, v in enumerate((*params, mode)):
        name = slots[q]
        if name is not None:
            named[name] = v
        elif v:
            raise ValueError(f"functor {functor} has no parameter in slot {_SLOTS[q]} (got {v})")
    return named


def map_reduce(
    functor: str,
    x: Buf,
    *,
    y: Buf | None = None,
    more: Sequence[Buf] = (),
    params: dict[str, float] | Sequence[float] | None = None,
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
    table: Buf | None = None,
    stride: int = 0,
    index: Buf | None = None,
    row_weight: Buf | None = None,
    rows_raw: Buf | None = None,
    totals_out: tuple[Buf, int] | None = None,
    param_from: tuple[Buf, int, float] | None = None,
    offset_from: tuple[Buf, int, float] | None = None,
) -> tuple[float, float] | None:
    """Run one functor over ``x`` (, ``y``, ``*more``) viewed as ``shape2d`` (rows, cols):
    builds a ``_C.Call`` and runs it (cpp/include/genloss/engine.h MapReduceArgs says what
    each field does).

    ``params``: the functor's parameters by name (``_C.FUNCTOR_PARAMS[functor]``), e.g.
    ``{"target": 1.0}``; a wrong or missing name is a TypeError naming the functor. (The
    positional form ``params=(a, b, c), mode=m`` of earlier callers is mapped by slot;
    omitted: every parameter 0.) ``grads[a]`` receives d f / d input a (None: not written).
    ``totals``: returns (sum of values, sum of d f / d x) (host doubles). Without a host
    round trip: ``totals_out=(buf, i)`` puts them in ``buf[i], buf[i + 1]`` (``zeros64``: a
    float64 array where the data is), and a later call reads one where it runs:
    ``param_from=(buf, i, scale)`` makes the functor's first parameter ``scale * buf[i]``
    (``params`` still names it), and ``offset_from=(buf, i, scale)`` the gradient offset.
    """
    rows, cols = shape2d if shape2d is not None else (x.rows, x.cols)
    ins = [x.ptr] + ([] if y is None else [y.ptr]) + [b.ptr for b in more]
    if not isinstance(params, dict):
        params = _positional_params(functor, (0.0, 0.0, 0.0) if params is None else params, mode)
    elif mode:
        raise TypeError(f"map_reduce: functor {functor}: pass mode by its name in params")
    if totals:
        data_used()  # the totals feed the caller's next step
    # Only the fields in use are passed (each keyword costs its parse on the hot path).
    extra: dict[str, Any] = {}
    if table is not None or index is not None or row_weight is not None or rows_raw is not None:
        extra.update(
            table=_p(table), table_rows=0 if table is None else table.rows, table_stride=stride, index=_p(index),
            index_type=0 if index is None else index.dtype, row_weight=_p(row_weight), out_rows_raw=_p(rows_raw),
        )  # fmt: skip
    if totals_out is not None or param_from is not None or offset_from is not None:
        # scalars passed between calls through memory: a plan keeps them in float64 scratch
        if totals_out is not None:
            extra["totals_out"] = totals_out[0].ptr + 8 * totals_out[1]
        if param_from is not None:
            extra.update(param_from=param_from[0].ptr + 8 * param_from[1], param_scale=param_from[2])
        if offset_from is not None:
            extra.update(offset_from=offset_from[0].ptr + 8 * offset_from[1], offset_scale=offset_from[2])
    if x.dtype > FLOAT64 and value_f32(x, out, rows_out):
        extra["value_f32"] = True
    if x.device != CPU:
        extra.update(workspace(x))
    call = run_call(
        functor=functor, params=params, dtype=x.dtype, device=x.device, device_id=x.device_id,
        stream=stream_of(x), ins=ins, grads=[_p(g) for g in grads], rows=rows, cols=cols, value_scale=value_scale,
        grad_scale=grad_scale, grad_offset=grad_offset, out_value=_p(out), out_rows=_p(rows_out),
        out_elems=_p(elems_out), accumulate=accumulate, totals=totals, **extra,
    )  # fmt: skip
    ran(call)
    return call.totals


# The engine's kernels other than map_reduce: kinds of the same Call (engine.h says what
# each field does), so a recording keeps them as it keeps map_reduce's.


def row_scale(
    x: Buf | None, out: Buf, *, coef: Buf | None = None, scale: float = 1.0, accumulate: bool = False
) -> None:
    """out[r, j] = scale * coef[r] * x[r, j] (coef None: 1; x None: ones, over out's (rows, cols))
    (+ out if accumulate)."""
    ref = out if x is None else x
    rows, cols = ref.rows_cols()
    ran(run_call(
        kind="row_scale", device=ref.device, device_id=ref.device_id, stream=stream_of(ref), dtype=ref.dtype,
        x=_p(x), coef=_p(coef), out=out.ptr, rows=rows, cols=cols, scale=scale, accumulate=accumulate,
    ))  # fmt: skip


def col_sum(x: Buf, out: Buf, *, scale: float = 1.0) -> None:
    """out[j] = scale * sum_r x[r, j]."""
    rows, cols = x.rows_cols()
    ran(run_call(
        kind="col_sum", device=x.device, device_id=x.device_id, stream=stream_of(x), dtype=x.dtype, x=x.ptr,
        out=out.ptr, rows=rows, cols=cols, scale=scale, **workspace(x),
    ))  # fmt: skip


def col_broadcast(v: Buf, out: Buf, *, scale: float = 1.0, accumulate: bool = False) -> None:
    """out[r, j] = scale * v[j] (+ out if accumulate)."""
    rows, cols = out.rows_cols()
    ran(run_call(
        kind="col_broadcast", device=v.device, device_id=v.device_id, stream=stream_of(v), dtype=v.dtype, v=v.ptr,
        out=out.ptr, rows=rows, cols=cols, scale=scale, accumulate=accumulate,
    ))  # fmt: skip


def row_map(
    functor: str,
    ins: Sequence[Buf | None],
    *,
    table: Buf | None = None,
    outs: Sequence[Buf | None] = (),
    params: Mapping[str, float] | None = None,
) -> None:
    """Per-row coefficients (engine.h RowMapArgs): row functor ``functor`` (ops/flow.h,
    ``_C.ROW_FUNCTORS``) on the (B,) inputs ``ins`` (None: absent, read as the functor's
    fallback; of the first one's dtype, or float64: a (B,) or (B, 1) float64 value an earlier
    step made), writing its float64 ``table`` (B, n_table) and its per-row ``outs`` in the
    first input's dtype. ``params`` by the names the functor declares; a wrong or missing one is
    a TypeError naming it."""
    fid, names, n_in, n_table, n_out = _C.ROW_FUNCTORS[functor]
    given = dict(params or {})
    slots: dict[str, float] = {}
    for slot, name in zip(("a", "b", "c", "mode"), names, strict=True):
        if name is not None:
            if name not in given:
                raise TypeError(f"row functor {functor}: missing parameter {name!r}")
            slots[slot] = given.pop(name)
    if given:
        raise TypeError(f"row functor {functor}: unknown parameter {next(iter(given))!r}")
    if len(ins) > n_in or len(outs) > n_out:
        raise ValueError(f"row functor {functor} takes {n_in} inputs and writes {n_out} outputs")
    x = next(b for b in ins if b is not None)
    rows = x.shape[0]
    wide = sum(1 << q for q, b in enumerate(ins) if b is not None and b.dtype == FLOAT64 != x.dtype)
    # the kernel reads and writes B entries of each (raw addresses: sizes are checked here)
    for q, b in enumerate((*ins, *outs)):
        is_in = q < len(ins)  # an input may be a (B, 1) column (a one-column table), as contiguous
        if b is not None and (
            b.shape not in ((rows,), (rows, 1) if is_in else (rows,))
            or (b.dtype != x.dtype and not (is_in and (wide >> q) & 1))
            or (b.device, b.device_id) != (x.device, x.device_id)
        ):
            raise ValueError(
                f"row functor {functor}: every input and output must be a ({rows},) array like the first"
            )
    if table is not None and (
        table.shape != (rows, n_table) or table.dtype != FLOAT64 or table.device != x.device
    ):
        raise ValueError(
            f"row functor {functor}: table must be a float64 ({rows}, {n_table}) array where the inputs are"
        )
    addrs = {f"x{q}": _p(b) for q, b in enumerate(ins)}
    addrs.update({f"out{j}": _p(b) for j, b in enumerate(outs)})
    ran(run_call(
        kind="row_map", device=x.device, device_id=x.device_id, stream=stream_of(x), dtype=x.dtype, functor=fid,
        rows=rows, table=_p(table), wide=wide, **slots, **addrs,
    ))  # fmt: skip


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
    """Row-wise log-sum-exp losses over (rows, K) logits (engine.h RowLseArgs, its modes)."""
    same_dtype_outputs("row_lse", logits, out, rows_out)
    rows, k = logits.shape
    ran(run_call(
        kind="row_lse", device=logits.device, device_id=logits.device_id, stream=stream_of(logits),
        dtype=logits.dtype, logits=logits.ptr, labels=_p(labels), label_type=0 if labels is None else labels.dtype,
        mode=mode, index=index, rows=rows, K=k, value_scale=value_scale, out_value=_p(out), accumulate=accumulate,
        out_rows=_p(rows_out), grad_scale=grad_scale, grad=_p(grad), **workspace(logits),
    ))  # fmt: skip


def gmm(
    x: Buf,
    logits: Buf,
    means: Buf,
    logvars: Buf,
    *,
    value_scale: float = 1.0,
    out: Buf | None = None,
    rows_out: Buf | None = None,
    resp: Buf | None = None,
    row_weights: Buf | None = None,
    grad_scale: float = 1.0,
    grads: Sequence[Buf | None] = (None, None, None, None),
) -> None:
    """The fused diagonal Gaussian mixture (engine.h GmmArgs); ``grads``: of x, logits,
    means, logvars (None: not written)."""
    same_dtype_outputs("gmm", x, out, rows_out)
    gx, gl, gm, gv = (_p(g) for g in grads)
    ran(run_call(
        kind="gmm", device=x.device, device_id=x.device_id, stream=stream_of(x), dtype=x.dtype, x=x.ptr,
        logits=logits.ptr, means=means.ptr, logvars=logvars.ptr, N=x.shape[0], K=logits.shape[0], D=x.shape[1],
        value_scale=value_scale, out_value=_p(out), out_rows=_p(rows_out), resp=_p(resp),
        row_weights=_p(row_weights), grad_scale=grad_scale, grad_x=gx, grad_logits=gl, grad_means=gm,
        grad_logvars=gv, **workspace(x),
    ))  # fmt: skip


def mmd(
    x: Buf,
    y: Buf,
    *,
    kernel: int,
    estimator: int,
    bandwidths: Sequence[float],
    out: Buf,
    grad_scale: float = 1.0,
    grads: Sequence[Buf | None] = (None, None),
) -> None:
    """The tiled MMD^2 kernel (genloss/mmd.h MmdArgs; kernel, estimator: their enums'
    indices); ``grads``: of x and y (None: not written)."""
    same_dtype_outputs("mmd", x, out)
    gx, gy = (_p(g) for g in grads)
    ran(run_call(
        kind="mmd", device=x.device, device_id=x.device_id, stream=stream_of(x), dtype=x.dtype, kernel=kernel,
        estimator=estimator, x=x.ptr, y=y.ptr, N=x.shape[0], M=y.shape[0], D=x.shape[1], bandwidths=list(bandwidths),
        out_value=out.ptr, grad_scale=grad_scale, grad_x=gx, grad_y=gy, **workspace(x),
    ))  # fmt: skip


def check_if_nan(value: Any, check: Any, out: Buf | None = None) -> None:
    """For functors that make the value NaN where an input is outside its domain
    (BernoulliNLL's targets, vlb_term's x0): run ``check()``, which reads the input
    again and raises naming it, only when the result has a NaN, instead of a separate
    min/max pass over the input on every call. ``out``: the Buf of ``value``, for a plan
    that repeats the NaN test (and declines when it finds one)."""
    _checked(None if out is None else ("no_nan", (out,)))
    if getattr(value, "is_cuda", False) and (not _check_data or _torch.cuda.is_current_stream_capturing()):
        return  # no read-back (``skip_checks``)
    nan = value.isnan().any() if hasattr(value, "isnan") else np.isnan(value).any()
    if bool(nan):
        check()


def int_range(b: Buf, replay: tuple | None = None) -> tuple[int, int] | None:
    """(min, max) of an integer array, on its own device (CUDA: synchronises), or None when
    ``skip_checks``. ``replay``: as ``float_range``."""
    _checked(replay)
    if skip_checks(b):
        return None
    return _min_max(b, int)
