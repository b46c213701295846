"""Inputs the engine must refuse (or copy) before a kernel reads them: malformed or
consumed DLPack capsules, broadcast views whose copy would not fit in memory, data not
aligned to its element size (python/genloss/native/_engine.py as_input and
cpp/src/bindings.cpp dlpack_info). Every error names the op and the argument."""

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import genloss.native as gn
from genloss import reference as ref

torch = pytest.importorskip("torch")
import genloss.torch as gt  # noqa: E402

# ---- DLPack producers built by hand (ctypes), to lie in every way a capsule can ----


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_NOOP = _DELETER(lambda _p: None)  # the memory below is owned by the producer object


class HandMade:
    """A float64 producer whose capsule says what the test tells it to say."""

    def __init__(self, values, *, device=1, ndim=None, shape=None, data=True, name=b"dltensor"):
        self.values = np.ascontiguousarray(values, dtype=np.float64)
        dims = list(self.values.shape) if shape is None else shape
        self.shape = (ctypes.c_int64 * max(len(dims), 1))(*dims)
        self.device = device
        self.name = name
        t = _DLTensor(
            self.values.ctypes.data if data else None,
            _DLDevice(device, 0),
            len(dims) if ndim is None else ndim,
            _DLDataType(2, 64, 1),
            self.shape,
            None,
            0,
        )
        self.managed = _DLManagedTensor(t, None, _NOOP)

    def __dlpack__(self, **_):
        return _capsule_new(ctypes.addressof(self.managed), self.name, None)

    def __dlpack_device__(self):
        return (self.device, 0)


class Returns:
    """A producer whose __dlpack__ returns a given object."""

    def __init__(self, obj, device=1):
        self.obj, self.device = obj, device

    def __dlpack__(self, **_):
        return self.obj

    def __dlpack_device__(self):
        return (self.device, 0)


def _consumed_capsule():
    cap = np.arange(3.0).__dlpack__()
    np.from_dlpack(Returns(cap))  # NumPy takes ownership and renames it used_dltensor
    return cap


def test_hand_made_producer_is_read_like_numpy():
    """The positive control: a well-formed hand-made capsule gives NumPy's result."""
    x = np.random.default_rng(0).normal(size=(4, 5))
    v, (g,) = gn.wgan_g_loss(HandMade(x))
    w, (h,) = gn.wgan_g_loss(x)
    assert v == w and np.array_equal(g, h)
    assert v == pytest.approx(-x.sum(axis=1).mean(), rel=1e-12)  # per-sample sums, batch mean


@pytest.mark.parametrize("device", [1, 2])  # CPU and CUDA intakes both check before any read
@pytest.mark.parametrize(
    "producer, error, match",
    [
        (lambda d: Returns(_consumed_capsule(), d), TypeError, "already consumed"),
        (lambda d: Returns(_capsule_new(8, b"not_dltensor", None), d), TypeError, "named 'not_dltensor'"),
        (lambda d: Returns(7, d), TypeError, "got int"),
        (lambda d: HandMade(np.zeros(3), device=d, ndim=100000), ValueError, r"ndim must be in \[0, 64\]"),
        (lambda d: HandMade(np.zeros(3), device=d, ndim=-1), ValueError, "ndim must be in"),
        (lambda d: HandMade(np.zeros(3), device=d, shape=[3, -2]), ValueError, "-2 in dimension 1"),
        (lambda d: HandMade(np.zeros(3), device=d, data=False), ValueError, "null data pointer"),
    ],
    ids=[
        "consumed",
        "wrong-name",
        "not-a-capsule",
        "huge-ndim",
        "negative-ndim",
        "negative-dim",
        "null-data",
    ],
)
def test_bad_dlpack_capsule_is_refused_naming_op_and_argument(producer, error, match, device):
    with pytest.raises(error, match=match) as e:
        gn.wgan_g_loss(producer(device))
    assert str(e.value).startswith("wgan_g_loss: fake_scores")


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", _DELETER),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


class Versioned(HandMade):
    """HandMade's tensor in a DLPack 1.x ("dltensor_versioned") capsule of a given version."""

    def __init__(self, values, major, *, device=1):
        super().__init__(values, device=device, name=b"dltensor_versioned")
        self.managed = _DLManagedTensorVersioned(major, 0, None, _NOOP, 0, self.managed.dl_tensor)


@pytest.mark.parametrize("device", [1, 2])
def test_versioned_capsule_of_another_major_version_is_refused(device):
    with pytest.raises(TypeError, match=r"^wgan_g_loss: fake_scores: DLPack version 2\.0 is not supported"):
        gn.wgan_g_loss(Versioned(np.zeros(3), 2, device=device))


def test_versioned_capsule_is_read():
    x = np.random.default_rng(4).normal(size=(3, 4))
    v, (g,) = gn.wgan_g_loss(Versioned(x, 1))
    w, (h,) = gn.wgan_g_loss(x)
    assert v == w and np.array_equal(g, h)


def test_null_data_is_fine_when_empty():
    """No elements, nothing to read: a null pointer is what some producers give."""
    b = gn._engine.as_input(HandMade(np.zeros((0, 3)), data=False), "x")
    assert b.shape == (0, 3) and b.numel == 0


def test_bad_dlpack_device_is_refused():
    class BadDevice(Returns):
        def __dlpack_device__(self):
            return (1,)

    with pytest.raises(TypeError, match=r"wgan_g_loss: fake_scores.__dlpack_device__\(\) must return"):
        gn.wgan_g_loss(BadDevice(np.arange(3.0).__dlpack__()))


# ---- broadcast (stride-0) views whose copy would not fit in memory -----------------

HUGE = 2**40  # elements: 8 TiB as float64, 4 TiB as float32


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda x: gn.wgan_g_loss(x), "fake_scores"),
        (lambda x: gn.l1_loss(x, x), "input"),
        (lambda x: gn.gaussian_kl(x, x), "mu"),
    ],
    ids=["wgan_g_loss", "l1_loss", "gaussian_kl"],
)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_huge_broadcast_view_is_refused_native(call, arg, kind):
    x = (
        np.broadcast_to(np.zeros(1), (HUGE,))
        if kind == "numpy"
        else torch.zeros(1, dtype=torch.float64).expand(HUGE)
    )
    with pytest.raises(
        ValueError, match=rf"{arg} is a non-contiguous .* shape \({HUGE},\) .* {HUGE * 8} bytes"
    ):
        call(x)


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda x: gt.wgan_g_loss(x), "fake_scores"),
        (lambda x: gt.l1_loss(x, x), "input"),
        (lambda x: gt.hinge_d_loss(x, x), "real_scores"),
    ],
    ids=["wgan_g_loss", "l1_loss", "hinge_d_loss"],
)
def test_huge_broadcast_view_is_refused_torch(call, arg):
    x = torch.zeros(1).expand(HUGE)
    with pytest.raises(ValueError, match=rf"{arg} is a non-contiguous .* {HUGE * 4} bytes"):
        call(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_huge_low_precision_view_is_refused_before_the_float32_copy(dtype):
    """float16 inputs are computed in float32: the upcast copy is checked against the
    machine's memory first (a broadcast view of 2 bytes is 4 TiB as float32). bfloat16 inputs go
    to the kernels as they are: their contiguous copy (2 TiB) is refused."""
    x = torch.zeros(1, dtype=dtype).expand(HUGE)
    if dtype == torch.float16:
        what, nbytes = f"a {dtype} tensor", HUGE * 4
    else:
        what, nbytes = "a non-contiguous tensor", HUGE * 2
    with pytest.raises(ValueError, match=rf"^l1_loss: input is {what} .* {nbytes} bytes"):
        gt.l1_loss(x, x)
    small = torch.full((1,), 0.5, dtype=dtype).expand(3, 4)  # small views still run, in float32
    assert gt.l1_loss(small, torch.zeros(3, 4, dtype=dtype)).item() == 0.5  # F.l1_loss: the mean of |x - y|


def test_small_broadcast_view_still_works():
    x = np.broadcast_to(np.float64(0.5), (3, 4))
    v, (g,) = gn.wgan_g_loss(x)
    assert v == pytest.approx(-4 * 0.5, rel=1e-15)  # per-sample sums, batch mean
    np.testing.assert_array_equal(g, np.full((3, 4), -1 / 3))


# ---- data not aligned to its element size ------------------------------------------


def _misaligned(a: np.ndarray) -> np.ndarray:
    """``a``'s values in a view that starts 1 byte past an aligned address."""
    raw = np.empty(a.nbytes + 1 + a.itemsize, dtype=np.uint8)
    off = (-raw.ctypes.data) % a.itemsize + 1
    m = raw[off : off + a.nbytes].view(a.dtype).reshape(a.shape)
    m[...] = a
    assert m.ctypes.data % a.itemsize and m.flags.c_contiguous and not m.flags.aligned
    return m


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_numpy_inputs_give_the_aligned_results(dtype):
    rng = np.random.default_rng(1)
    x, y = (rng.normal(size=(64, 33)).astype(dtype) for _ in range(2))
    got = gn.gan_d_loss(_misaligned(x), _misaligned(y))
    want = gn.gan_d_loss(x, y)
    assert got[0] == want[0]
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_array_equal(g, w)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    np.testing.assert_allclose(got[0], ref.gan_d_loss(xd, yd), rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_misaligned_integer_labels_give_the_aligned_results():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(16, 6))
    labels = rng.integers(0, 5, size=16).astype(np.int64)
    got = gn.ssgan_critic_loss(logits, _misaligned(labels), logits[:8], logits[8:])
    want = gn.ssgan_critic_loss(logits, labels, logits[:8], logits[8:])
    assert got[0] == want[0]
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_array_equal(g, w)


def test_misaligned_torch_input_gives_the_aligned_result():
    x = np.random.default_rng(3).normal(size=(8, 9))
    m = torch.from_numpy(_misaligned(x))
    assert m.data_ptr() % 8
    v, (g,) = gn.wgan_g_loss(m)
    w, (h,) = gn.wgan_g_loss(torch.from_numpy(x))
    assert v == w and torch.equal(g, h)


# ---- dtype messages say what each layer accepts ------------------------------------


def test_integer_logits_message_says_what_native_accepts():
    with pytest.raises(TypeError) as e:
        gn.gan_d_loss(np.zeros(3, np.int64), np.zeros(3))
    msg = str(e.value)
    assert msg.startswith("gan_d_loss: real_logits must be float32, float64, float16 or bfloat16, got int64")


def test_torch_layer_takes_half_precision_on_cpu():
    """genloss.torch computes CPU float16 in float32 (the value is float32)."""
    x = torch.randn(4, 5)
    v = gt.wgan_g_loss(x.half())
    want = -x.half().double().sum(dim=1).mean()  # per-sample sums, batch mean
    assert float(v) == pytest.approx(float(want), rel=1e-6)


def test_bad_input_matrix_in_a_subprocess(tmp_path):
    """The registry-driven bad-input matrix (tests/bad_input_matrix.py: every op x every way of
    breaking one argument x reference, native and torch), crash-isolated in child processes:
    every case must be refused with a ValueError/TypeError naming the op and the argument.
    The counts are printed (pytest -s shows them) and kept in the JSON report."""
    report = tmp_path / "matrix.json"
    script = Path(__file__).with_name("bad_input_matrix.py")
    run = subprocess.run(
        [sys.executable, str(script), "--json", str(report)], capture_output=True, text=True, timeout=1800
    )
    print(run.stdout)
    counts = json.loads(report.read_text())["counts"]
    assert run.returncode == 0 and counts["named"] > 2000, run.stdout[-4000:] + run.stderr[-2000:]
    assert {k: v for k, v in counts.items() if k != "named"} == dict.fromkeys(
        ("no_op_name", "unclear", "accepted", "crashed", "hung"), 0
    )


def test_cuda_problem_says_what_to_do():
    """The CUDA engine's readiness, from the probe's numbers: each failure says what to do."""
    from genloss.native._engine import cuda_problem

    ok = {"built": True, "runtime_version": 13000, "driver_version": 13000, "device_count": 1, "error": ""}
    assert cuda_problem(ok) == ""
    assert cuda_problem({**ok, "driver_version": 13020}) == ""  # a newer driver
    assert cuda_problem({**ok, "runtime_version": 13010}) == ""  # minor-version compatibility
    assert "built without CUDA" in cuda_problem({**ok, "built": False})
    assert "no NVIDIA driver" in cuda_problem({**ok, "driver_version": 0})
    old = cuda_problem({**ok, "driver_version": 12080, "error": "CUDA driver version is insufficient"})
    assert "CUDA 13.0 runtime" in old and "supports CUDA 12.8" in old and "update the NVIDIA driver" in old
    assert "no CUDA device" in cuda_problem({**ok, "device_count": 0})
    assert "'out of memory'" in cuda_problem({**ok, "error": "out of memory"})


def test_cuda_runtime_probe_matches_the_build():
    info = gn._engine._C.cuda_runtime()
    assert info["built"] == gn._engine._C.build_info()["cuda"]
    assert (info["runtime_version"] >= 11000) == info["built"]


def test_cuda_input_is_refused_with_the_reason_when_the_engine_cannot_run():
    from genloss.native._engine import cuda_problem

    problem = cuda_problem(gn._engine._C.cuda_runtime())
    if not problem:
        pytest.skip("the CUDA engine can run on this machine")
    fake = HandMade(np.arange(3.0), device=2)  # a CUDA array as a producer describes it
    with pytest.raises(RuntimeError, match=r"^wgan_g_loss: fake_scores is a CUDA array, but ") as info:
        gn.wgan_g_loss(fake)
    assert problem in str(info.value)


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "nested"])
def test_sparse_and_nested_tensors_are_named(kind):
    """A sparse or nested tensor reached torch's own errors ("unsupported memory format option
    Contiguous", "NestedTensorImpl doesn't support sizes", or the dispatcher's "Could not run ...
    SparseCPU"): now a TypeError naming the op and the argument, in the native and torch layers."""
    torch = pytest.importorskip("torch")
    import warnings

    import genloss.native as gn
    import genloss.torch as gt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype API
        x = {
            "sparse_coo": lambda: torch.randn(2, 3).to_sparse(),
            "sparse_csr": lambda: torch.randn(2, 3).to_sparse_csr(),
            "nested": lambda: torch.nested.nested_tensor([torch.randn(3), torch.randn(3)]),
        }[kind]()
    y = torch.randn(2, 3)
    want = "a nested tensor" if kind == "nested" else f"layout torch.{kind}"
    for call in (lambda: gn.gan_d_loss(x, y), lambda: gt.gan_d_loss(x, y), lambda: gt.mmd2(x, y)):
        with pytest.raises(
            TypeError, match=rf"^[a-z_0-9]+: (real_logits|x) must be a dense \(strided\) tensor, got {want}"
        ):
            call()
