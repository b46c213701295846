"""Type stub of ``genloss._C``, the pybind11 module built from cpp/src/.

Kept by hand beside the bindings (one ``m.def``/``m.attr`` there, one entry here):
bindings.cpp, bindings_mmd.cpp, plan.cpp and host_cache.cpp. Pointers and
CUDA streams are ``int`` (``std::uintptr_t``; 0 = absent), device is 0 (CPU) or 1
(CUDA), dtype is the engine's code (0 float32, 1 float64, 2 float16, 3 bfloat16;
index arrays: 0 int64, 1 int32). The functions without ``py::arg`` names in the
bindings are positional-only here, as they are at run time.
"""

from collections.abc import Sequence
from typing import Any, Literal, TypedDict, overload

from typing_extensions import CapsuleType

# ---- constants -------------------------------------------------------------------

FUNCTORS: dict[str, int]  # functor name -> id (GENLOSS_FUNCTORS in genloss/engine.h)
FUNCTOR_PARAMS: dict[str, tuple[str, ...]]  # functor name -> its parameter names (ParamNames, ops/*.h)
FUNCTOR_SLOTS: dict[str, tuple[str | None, ...]]  # functor name -> the names of Params a, b, c, mode
# row functor name -> (id, names of its parameters a, b, c, mode or None, n_in, n_table, n_out):
# the row functors of kind "row_map" (GENLOSS_ROW_FUNCTORS in genloss/engine.h, ops/flow.h)
ROW_FUNCTORS: dict[str, tuple[int, tuple[str | None, ...], int, int, int]]
MMD_TILE: int  # kMmdTile, genloss/mmd.h
MMD_KERNELS: tuple[str, ...]  # index = enum MmdKernel
MMD_ESTIMATORS: tuple[str, ...]  # index = enum MmdEstimator
HOST_CACHE_MIN_BYTES: int  # kHostCacheMinBytes, cpu_config.h
LFQ_MAX_BITS: int  # kLfqMaxBits, quant_cpu.h

# ---- the engine: typed Calls (plan.cpp) and the other primitives ----------------------

class Call:
    """One engine call (plan.cpp); every field by keyword. ``kind`` "map_reduce" (the
    default): the fields of engine.h's MapReduceArgs. ``params``: the functor's parameters
    by name (``FUNCTOR_PARAMS[functor]``), all of them and no other (TypeError naming the
    functor otherwise); ``ins``: as many addresses as the functor's arity; ``totals``: ask
    for (sum of values, sum of d f / d input 0), read back from ``.totals`` after ``run``;
    ``totals_out``: the address of two float64 where the data is that receive them instead
    (no host round trip), and ``param_from`` / ``offset_from`` the address of one that
    gives, times ``param_scale`` / ``offset_scale``, the functor's first parameter / the
    gradient offset when the call runs (``params`` still names that parameter). Such calls
    are not recorded in a plan.
    Another kind ("row_scale", "col_sum", "col_broadcast", "row_lse", "gmm", "mmd", "row_map",
    "vector_quantize", "vq_ema_update", "lfq_entropy", "knn_prdc", "sinkhorn", "assignment"): the
    fields of its Args struct (engine.h, mmd.h, quant_cpu.h, knn.h, ot.h)
    by their names (e.g. row_lse's ``logits``, ``mode``, ``rows``, ``K``, ``out_value``,
    ``grad``; mmd's ``bandwidths`` and sinkhorn's ``eps``, lists), read back from
    ``.fields``; with ``device``, ``device_id`` and ``stream`` as for map_reduce. An unknown
    or missing field is a TypeError naming the kind."""

    @overload
    def __init__(
        self,
        *,
        functor: str,
        ins: Sequence[int],
        rows: int,
        cols: int,
        kind: Literal["map_reduce"] = "map_reduce",
        params: dict[str, float] | None = None,
        dtype: int = 0,
        device: int = 0,
        device_id: int = 0,
        stream: int = 0,
        grads: Sequence[int] = (),
        value_scale: float = 1.0,
        grad_scale: float = 1.0,
        grad_offset: float = 0.0,
        out_value: int = 0,
        out_rows: int = 0,
        out_elems: int = 0,
        out_rows_raw: int = 0,
        accumulate: bool = False,
        totals: bool = False,
        table: int = 0,
        table_rows: int = 0,
        table_stride: int = 0,
        index: int = 0,
        index_type: int = 0,
        row_weight: int = 0,
        totals_out: int = 0,
        param_from: int = 0,
        param_scale: float = 0.0,
        offset_from: int = 0,
        offset_scale: float = 0.0,
    ) -> None: ...
    @overload
    def __init__(
        self,
        *,
        kind: Literal[
            "row_scale",
            "col_sum",
            "col_broadcast",
            "row_lse",
            "gmm",
            "mmd",
            "row_map",
            "vector_quantize",
            "vq_ema_update",
            "lfq_entropy",
            "knn_prdc",
            "sinkhorn",
            "assignment",
        ],
        **fields: Any,
    ) -> None: ...
    @property
    def kind(self) -> str: ...
    @property
    def fields(self) -> dict[str, int | float | bool | tuple[float, ...]] | None:
        """Another kind's fields by name; None for map_reduce (its own properties)."""
    # map_reduce's fields (AttributeError for another kind):
    @property
    def functor(self) -> str: ...
    @property
    def params(self) -> dict[str, float | int]: ...
    @property
    def rows(self) -> int: ...
    @property
    def cols(self) -> int: ...
    @property
    def value_scale(self) -> float: ...
    @property
    def grad_scale(self) -> float: ...
    @property
    def totals(self) -> tuple[float, float] | None: ...

def run_call(**fields: Any) -> Call:
    """``Call(**fields)``, run as ``run`` runs it, and returned (one C call, no dict:
    the hot path of the compositions no plan serves). On CUDA, ``workspace=alloc``
    (``alloc(device_id, nbytes) -> (address, owner)``, _engine.py) gives the call its
    scratch from the caller's allocator; without it the scratch falls back to
    cudaMallocAsync (``cuda_scratch_fallbacks``)."""

# Only in builds with -Ccmake.define.GENLOSS_CUDA_EMULATOR=ON (build_info()["cuda_emulator"]):
def cuda_emulator(on: bool) -> bool:
    """Run every CPU engine call on the host emulation of the CUDA engine's kernels (True) or
    on the CPU engine (False); returns the previous setting. For tests
    (tests/test_cuda_emulated.py, cuda/emulator/emulator.h)."""

def cuda_emulator_launches() -> int:
    """How many kernel launches the CUDA emulator ran in this process."""

def cuda_scratch_fallbacks() -> int:
    """How many CUDA scratch buffers fell back to cudaMallocAsync in this process (a call
    without a workspace from its caller, or a kind that does not report its size)."""

def run(calls: Call | Sequence[Call]) -> None:
    """Run a Call or a sequence of Calls in order with the GIL released: the one entry
    point of the engine (map_reduce and its kernels)."""

def dlpack_info(
    cap: object, name: str = "array"
) -> tuple[int, int, int, int, int, int, tuple[int, ...], tuple[int, ...] | None]:
    """(data_ptr, dtype_code, bits, lanes, device_type, device_id, shape, strides) of an
    unconsumed DLPack capsule; strides None when the producer gave none (contiguous).
    TypeError/ValueError naming ``name`` for anything else (not a capsule, consumed, bad shape)."""

# ---- cached plans (plan.cpp): None means "take the Python path" ------------------------

class PlanCache:
    """Recorded compositions (their Calls with pointers as input/output/scratch slots, and
    their guards: checks of the data re-run on every call; ``allocs``: the arrays the
    composition allocated, its outputs and its scratch), keyed by (key, input dtypes, input
    shapes), replayed on new plain CPU torch tensors. Keys compare by type and float bits."""

    def __init__(self) -> None: ...
    def run(self, key: Any, arrays: Sequence[Any]) -> tuple[Any, tuple[Any, ...]] | None: ...
    def add(
        self,
        key: Any,
        arrays: Sequence[Any],
        calls: Sequence[Call],
        result: Any,
        guards: Sequence[tuple[str, tuple[int, ...], float]] | None = None,
        allocs: Sequence[Any] | None = None,
    ) -> bool: ...
    def clear(self) -> None: ...
    def __len__(self) -> int: ...

# ---- build and runtime configuration (bindings.cpp, config.cpp) ----------------------

class _BuildInfo(TypedDict):
    cuda: bool
    isa: str
    openmp: bool
    omp_max_threads: int
    cuda_archs: str
    compiler: str

class _Config(TypedDict):
    isa: str
    isa_forced: str  # "" when GENLOSS_ISA is unset
    threads: int
    threads_setting: int  # 0: OpenMP's default
    forked: bool  # a child forked from a process that had used the engine
    stream_min_bytes: int  # < 0: never stream
    nt_stores: bool
    huge_pages: bool
    host_cache_mb: int  # < 0: sized by use

def build_info() -> _BuildInfo: ...
def cuda_runtime() -> dict[str, int | str | bool]: ...
def config() -> _Config: ...
def config_warnings() -> list[str]: ...
def set_threads(n: int, /) -> None: ...
def set_stream_min_bytes(n: int, /) -> None: ...
def set_huge_pages(on: bool, /) -> None: ...
def set_nt_stores(on: bool, /) -> None: ...
def set_host_cache_mb(mb: int, /) -> None: ...
def streamed_calls() -> int: ...

# ---- CPU output cache (host_cache.cpp) -------------------------------------------------

class _HostCacheInfo(TypedDict):
    cached_bytes: int
    cached_blocks: int
    limit_bytes: int
    sized_by_use: bool
    live_bytes: int
    recent_peak_bytes: int
    cap_bytes: int
    window_requests: int
    hits: int
    misses: int

def cached_empty(shape: Sequence[int], dtype: int) -> CapsuleType:
    """A DLPack capsule of a new C-contiguous CPU array from the block cache (dtype: an engine
    DType code, 0 float32, 1 float64, 2 float16, 3 bfloat16)."""

def cached_empty_numpy(shape: Sequence[int], dtype: int) -> Any:
    """A new writeable C-contiguous NumPy array from the block cache (dtype 0 float32, 1 float64,
    2 float16); the block returns to the cache when the array dies."""

def host_cache_info() -> _HostCacheInfo: ...
def host_cache_clear() -> None: ...
