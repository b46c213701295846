r"""One record per operation: what every generic test (and ``genloss verify``) needs to know.

A record names the entry points of an op in every layer (reference forward and
backward, native, torch), its array arguments with their input DOMAIN and a
SHAPE RULE in symbols, the differentiable arguments, the reductions, the
hyperparameters and the variants of them worth covering, and the derivation it
implements.  ``make_inputs`` turns a record into arrays; ``call_kwargs`` into the
keyword arguments of a call.  Adding an op to the library = adding a record here;
every test in ``tests/`` that iterates ``RECORDS`` then covers it.

Shape rules
-----------
Each array argument has a tuple of symbols, resolved against a ``sizes`` dict:

* an int symbol (``'B'``, ``'Br'``, ``'Bf'``, ``'K'``, ``'F'``, ...) is one dimension;
* a symbol starting with ``'...'`` (``'...'``, ``'...2'``) is a tuple of trailing dims
  (possibly empty), e.g. ``('B', '...')`` = batch first, any trailing dims;
* a symbol made of digits (``'1'``) is a literal size (a broadcast dimension).

Arguments that share a symbol get the same size.  Two-population ops use
separate batch symbols (``'Br'``/``'Bf'``) and share their trailing dims; the
symbols an op does NOT require to match (it would accept them different) are
listed in ``loose``.

Variants may change the arguments, not only the hyperparameters
----------------------------------------------------------------
A ``Variant`` may replace an argument (``args=``: another shape rule, e.g. a
per-feature or 0-d log-variance) or bring in an OPTIONAL one (``Arg(optional=True)``
is absent unless a variant supplies it: ``negative_elbo``'s ``recon_logvar``).
``record.at(variant)`` is the record specialised to one variant: exactly the
arguments of that call, the differentiable ones among them, and entry points that
take every array positionally (arguments marked ``keyword=True`` are routed to
their keyword).  ``cases()`` yields specialised records, so a test written for a
fixed signature covers every variant; ``make_inputs`` specialises by itself.

Outputs
-------
The value is a loss (0-d, or ``(B,)`` for ``'none'``), or, for ``elementwise``
records, the broadcast shape of the inputs (``normal_kl``), or any array of a
value-only record (``differentiable=()``, ``reference_backward=None``:
``gmm_responsibilities``); tests take the expected shape from the reference.
The native entry point of a value-only op is adapted to the ``(value, ())``
form of the others.

This module imports only NumPy and the reference: no pytest, no torch, no native
module (those are looked up lazily, so ``genloss verify`` works without them).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .reference import diffusion as _dif
from .reference import divergence as _div
from .reference import gan as _gan
from .reference import vae as _vae

__all__ = [
    "DOMAINS",
    "EXTREME",
    "KINK_MARGIN",
    "NOT_REGISTERED",
    "ODD_SIZES",
    "RECORDS",
    "Arg",
    "Hyper",
    "OpRecord",
    "Variant",
    "by_name",
    "call_kwargs",
    "capped",
    "cases",
    "draw_sizes",
    "extreme_ok",
    "extreme_value",
    "grad_scale",
    "make_inputs",
    "resolve_shapes",
]

EXTREME = 1e4  # magnitude of the "extreme logits" every logit op must survive (SPEC)
KINK_MARGIN = 1e-2  # inputs are kept this far from kinks (FD steps are 1e-6; gradcheck's 1e-6)


# ============================================================================= record types


@dataclass(frozen=True)
class Arg:
    """An array argument: its name, input domain (a key of ``DOMAINS``) and shape rule."""

    name: str
    domain: str
    shape: tuple[str, ...]
    kinks: tuple[float, ...] = ()  # elementwise non-differentiable points (hinge: 1, -1)
    broadcast: bool = False  # a parameter that broadcasts (fewer dims or a 0-d array are valid)
    optional: bool = False  # absent (None) unless a variant supplies it in ``Variant.args``
    keyword: bool = False  # passed by keyword (it follows the hyperparameters in the signature)


@dataclass(frozen=True)
class Hyper:
    """A non-array argument: ``kind`` is 'real' (finite float), 'flag' (bool), 'choice' or 'int'."""

    name: str
    kind: str
    choices: tuple[str, ...] = ()
    low: float | None = None  # 'real' with a lower bound (beta >= 0): a value below it is bad input


@dataclass(frozen=True)
class Variant:
    """A setting of the hyperparameters to cover, with what it changes for the tests.

    ``extreme_finite``: None inherits the record's flag; False where the math itself
    overflows at |x| = 1e4 (exp-based f-divergences).  ``fd``: False where the
    backward is by design not the derivative of the forward (spectral norm with an
    unconverged power iteration).  ``same``: pairs (symbol, symbol it must equal),
    e.g. RSGAN pairs real and fake element by element.  ``loose``: None inherits the
    record's; else the symbols this variant does not require to match.  ``args``:
    arguments that replace the record's of the same name (another shape rule) or
    supply an optional one.
    """

    params: tuple[tuple[str, Any], ...] = ()
    extreme_finite: bool | None = None
    fd: bool = True
    same: tuple[tuple[str, str], ...] = ()
    loose: tuple[str, ...] | None = None
    args: tuple[Arg, ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def id(self) -> str:
        parts = [f"{k}={v}" for k, v in self.params]
        parts += [f"{a.name}:{'x'.join(a.shape) or 'scalar'}" for a in self.args]
        return ",".join(parts) or "default"


def _v(
    extreme_finite: bool | None = None, fd: bool = True, same=(), loose=None, args=(), **params: Any
) -> Variant:
    return Variant(tuple(params.items()), extreme_finite, fd, tuple(same), loose, tuple(args))


DEFAULT = Variant()


@dataclass(frozen=True)
class OpRecord:
    """Everything the generic tests need to know about one operation."""

    name: str
    family: str
    reference: Callable[..., Any]
    reference_backward: Callable[..., Any] | None  # None: a value-only op (no gradient)
    args: tuple[Arg, ...]
    differentiable: tuple[str, ...]
    reductions: tuple[str, ...]  # () = the op takes no ``reduction`` argument
    derivation: str  # e.g. 'gan.md#GAN.3'
    hypers: tuple[Hyper, ...] = ()
    variants: tuple[Variant, ...] = (DEFAULT,)
    extreme_finite: bool = True  # value and grads stay finite for inputs of magnitude 1e4
    kink_pairs: tuple[tuple[str, str], ...] = ()  # (a, b): non-differentiable where a == b
    norm_kink: str | None = None  # arg whose per-sample norm has a kink at the variant's ``center`` and at 0
    loose: tuple[str, ...] = ()
    has_native: bool = True
    # forward returns a tuple; the loss-like value is this element (``native`` returns only it)
    value_index: int | None = None
    torch_name: str = ""  # '' = name
    elementwise: bool = False  # the value has the inputs' broadcast shape (no reduction, no batch mean)
    caps: tuple[tuple[str, int], ...] = ()  # largest size of a symbol in the large-input tests (cost)
    # (symbol, smallest nonzero size, largest size): unbiased MMD needs 2 points; mmd2's exact
    # direct body covers D <= 4 (the blocked body's expansion has a documented limit at extremes)
    size_limits: tuple[tuple[str, int, int], ...] = ()
    rejects: tuple[tuple[Variant, str], ...] = ()  # invalid combinations: (variant, argument the error names)
    # (argument, symbol): each entry of d/d<argument> sums one term of magnitude <= 1 per index
    # of the symbol (times the upstream gradient), terms that may cancel; see ``grad_scale``.
    bounded_sums: tuple[tuple[str, str], ...] = ()
    base: OpRecord | None = None  # the unspecialised record, for one made by ``at``
    notes: str = ""

    def __post_init__(self) -> None:
        # Arrays passed by keyword: the entry points take every array positionally, in ``args`` order.
        names = tuple(a.name for a in self.args)
        keyword = frozenset(a.name for a in self.args if a.keyword)
        object.__setattr__(self, "reference", _routed(self.reference, names, keyword))
        if self.reference_backward is not None:
            object.__setattr__(
                self, "reference_backward", _routed(self.reference_backward, names, keyword, backward=True)
            )

    # -- one variant -------------------------------------------------------------
    def at(self, variant: Variant) -> OpRecord:
        """This record specialised to ``variant``: its arguments (replaced / optional ones supplied,
        absent optional ones left out), the differentiable ones among them, that one variant."""
        base = self.base or self
        over = {a.name: a for a in variant.args}
        args = tuple(over.get(a.name, a) for a in base.args if a.name in over or not a.optional)
        names = {a.name for a in args}
        return dataclasses.replace(
            base,
            args=args,
            differentiable=tuple(n for n in base.differentiable if n in names),
            variants=(variant,),
            reference=_raw(base.reference),
            reference_backward=None if base.reference_backward is None else _raw(base.reference_backward),
            base=base,
        )

    # -- entry points in the other layers (imported lazily) -------------------
    @property
    def native(self) -> Callable[..., Any] | None:
        """``genloss.native.<name>`` or None (no native version; imports the compiled module).

        Arrays positionally (keyword ones routed); a value-only op is adapted to return
        ``(value, ())`` and to accept (and ignore) ``need_grad``."""
        if not self.has_native:
            return None
        fn = getattr(importlib.import_module("genloss.native"), self.name)
        if not self.base_differentiable:
            fn = _value_only(fn)
        if self.value_index is not None:
            fn = _picked(fn, self.value_index)
        return self._route(fn)

    @property
    def torch_op_name(self) -> str:
        return self.torch_name or self.name

    @property
    def torch(self) -> Callable[..., Any]:
        """``genloss.torch.<name>`` (imports torch), arrays positionally (keyword ones routed)."""
        return self._route(getattr(importlib.import_module("genloss.torch"), self.torch_op_name))

    def bind(self, arrays: tuple, kwargs: Mapping[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """(positional, keyword) arguments of a call with ``arrays`` in ``args`` order."""
        return _bind(self.arg_names, frozenset(a.name for a in self.args if a.keyword), arrays, kwargs)

    def _route(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return _routed(fn, self.arg_names, frozenset(a.name for a in self.args if a.keyword))

    @property
    def base_differentiable(self) -> tuple[str, ...]:
        """The differentiable arguments of the op (any variant)."""
        return (self.base or self).differentiable

    # -- derived facts ---------------------------------------------------------
    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    def arg(self, name: str) -> Arg:
        return next(a for a in self.args if a.name == name)

    @property
    def float_args(self) -> tuple[Arg, ...]:
        return tuple(a for a in self.args if DOMAINS[a.domain].kind == "float")

    @property
    def avoids_kinks(self) -> bool:
        """Whether input generation keeps away from non-differentiable points."""
        return bool(self.kink_pairs or self.norm_kink or any(a.kinks for a in self.args))

    @property
    def batch_arg(self) -> Arg:
        """The argument whose batch a ``'none'`` reduction returns (the first one)."""
        return self.args[0]

    def loose_symbols(self, variant: Variant) -> tuple[str, ...]:
        return self.loose if variant.loose is None else variant.loose


def extreme_ok(record: OpRecord, variant: Variant) -> bool:
    """Whether extreme inputs (each domain's ``extreme_value``) must give a finite value and gradients."""
    return record.extreme_finite if variant.extreme_finite is None else variant.extreme_finite


def _bind(names, keyword, arrays, kwargs):
    pos = tuple(a for n, a in zip(names, arrays, strict=False) if n not in keyword)
    kw = {n: a for n, a in zip(names, arrays, strict=False) if n in keyword}
    return pos + tuple(arrays[len(names) :]), {**kw, **kwargs}


def _raw(fn: Callable[..., Any]) -> Callable[..., Any]:
    return getattr(fn, "__genloss_raw__", fn)


def _routed(fn: Callable[..., Any], names: tuple[str, ...], keyword: frozenset, backward: bool = False):
    """``fn`` taking every array positionally in ``names`` order (then ``grad_output`` for a
    backward); the arrays named in ``keyword`` are passed by keyword.  Absent optional arrays
    are trailing, so fewer arrays than names is fine."""
    fn = _raw(fn)
    if not keyword:
        return fn

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        arrays, rest = (args[:-1], args[-1:]) if backward else (args, ())
        pos, kw = _bind(names, keyword, arrays, kwargs)
        return fn(*pos, *rest, **kw)

    call.__genloss_raw__ = fn  # type: ignore[attr-defined]
    return call


def _picked(fn: Callable[..., Any], index: int) -> Callable[..., Any]:
    """A native function whose value is a tuple, returning its loss-like element ``index``."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> tuple[Any, tuple]:
        value, grads = fn(*args, **kwargs)
        return value[index], grads

    return call


def _value_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A native function returning one array, in the ``(value, grads)`` form (grads always empty)."""

    @functools.wraps(fn)
    def call(*args: Any, need_grad: Any = True, **kwargs: Any) -> tuple[Any, tuple]:
        return fn(*args, **kwargs), ()

    return call


# ============================================================================= input domains


@dataclass(frozen=True)
class Domain:
    description: str
    kind: str  # 'float' | 'int'
    make: Callable[[np.random.Generator, tuple[int, ...], Mapping[str, Any], Mapping[str, Any]], np.ndarray]
    extreme: bool = True  # whether ``extreme=True`` injects +-extreme_value into this argument
    extreme_value: float = EXTREME  # 1e4 for logits; 30 for log-variances (e^30 ~ 1e13) and moderate data
    bounds: tuple[float, float] | None = None  # a closed domain: finite differences go one-sided at its ends
    invalid: tuple[float, ...] = ()  # values outside the domain the ops must refuse (bad-input tests)


def _few(rng: np.random.Generator, n: int, frac: float) -> np.ndarray:
    """Indices of about ``frac`` of ``n`` entries (at least one when n > 0)."""
    k = min(n, max(1, int(round(frac * n))))
    return rng.choice(n, size=k, replace=False) if n else np.zeros(0, dtype=np.int64)


def _logits(rng, shape, sizes, hyper):
    x = 3.0 * rng.standard_normal(shape)
    if x.size >= 4:  # a few large logits: saturated sigmoids, softplus(l) ~ l
        idx = _few(rng, x.size, 0.1)
        x.flat[idx] = rng.choice([-1.0, 1.0], size=idx.size) * rng.uniform(12.0, 40.0, size=idx.size)
    return x


def _scores(rng, shape, sizes, hyper):
    return 2.0 * rng.standard_normal(shape)


def _outputs(rng, shape, sizes, hyper):
    return rng.uniform(-0.25, 1.25, size=shape)


def _grads(rng, shape, sizes, hyper):
    x = rng.standard_normal(shape)
    if shape[0] >= 2 and rng.random() < 0.5:
        x[rng.integers(shape[0])] = 0.0  # g_b = 0: the penalty's cone point (gradient defined as 0)
    return x


def _features(rng, shape, sizes, hyper):
    return rng.standard_normal(shape) + 0.5


def _labels(rng, shape, sizes, hyper):
    return rng.integers(0, sizes["K"] - 1, size=shape, dtype=np.int64)  # [0, C), C = K - 1


def _images(rng, shape, sizes, hyper):
    return rng.uniform(-1.0, 1.0, size=shape)


def _weight(rng, shape, sizes, hyper):
    """W = U diag(s) V^T with s_1 = 3 and the rest in [0.1, 1.5]: a spectral gap of at least 2,
    so 30 power iterations converge to ~1e-18."""
    m, n = shape
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    s = np.concatenate([[3.0], rng.uniform(0.1, 1.5, size=r - 1)])
    return (u * s) @ v.T


def _vector(rng, shape, sizes, hyper):
    return rng.standard_normal(shape)


def _moderate(rng, shape, sizes, hyper):
    return rng.uniform(-2.0, 2.0, size=shape)


def _data(rng, shape, sizes, hyper):
    return 1.5 * rng.standard_normal(shape)


def _probabilities(rng, shape, sizes, hyper):
    x = rng.uniform(0.0, 1.0, size=shape)
    if x.size >= 2:  # binary data: exact 0 and 1 (the ends of the domain)
        idx = _few(rng, x.size, 0.3)
        x.flat[idx] = rng.integers(0, 2, size=idx.size).astype(np.float64)
    return x


def _log_weights(rng, shape, sizes, hyper):
    x = -5.0 + 3.0 * rng.standard_normal(shape)
    if x.size >= 4:  # a few weights far apart: a near one-hot softmax
        idx = _few(rng, x.size, 0.1)
        x.flat[idx] = rng.uniform(-60.0, 20.0, size=idx.size)
    return x


def _timesteps(rng, shape, sizes, hyper):
    """Timesteps in [0, T) of the variant's schedule; the decoder step 0 and the last step often."""
    T = hyper["schedule"].num_timesteps
    t = rng.integers(0, T, size=shape, dtype=np.int64)
    if t.size >= 2:
        t.flat[0] = 0
        t.flat[-1] = T - 1
    return t


def _levels(rng, shape, sizes, hyper):
    """Data on the grid of 2^bits levels in [-1, 1], the two edge levels often."""
    n = 2 ** int(hyper.get("bits", 8)) - 1
    k = rng.integers(0, n + 1, size=shape)
    if k.size >= 3:
        idx = _few(rng, k.size, 0.3)
        k.flat[idx] = rng.choice([0, n], size=idx.size)
    return -1.0 + 2.0 * k / n


def _unit_box(rng, shape, sizes, hyper):
    return rng.uniform(-1.0, 1.0, size=shape)


def _sample_weights(rng, shape, sizes, hyper):
    return rng.uniform(0.0, 2.0, size=shape)


DOMAINS: dict[str, Domain] = {
    "logits": Domain("real line, 3*N(0,1) plus ~10% of magnitude 12..40", "float", _logits),
    "scores": Domain("real line, 2*N(0,1) (critic scores, f-GAN critic outputs)", "float", _scores),
    "outputs": Domain("raw outputs in [0, 1]-ish: U(-0.25, 1.25)", "float", _outputs),
    "grads": Domain("N(0,1) per-sample gradients; half the time one sample is exactly 0", "float", _grads),
    "features": Domain("N(0.5, 1) features", "float", _features),
    "class_logits": Domain("2-D (B, K = C+1) logits, as 'logits'", "float", _logits),
    "labels": Domain("int64 class labels in [0, C), C = K - 1", "int", _labels, extreme=False),
    "images": Domain("U(-1, 1) images", "float", _images),
    "weight": Domain("(out, in) matrix with singular values 3 > 1.5 >= s_i >= 0.1", "float", _weight, False),
    "vector": Domain("N(0,1) vector (power-iteration start)", "float", _vector, extreme=False),
    "mean": Domain("Gaussian means, U(-2, 2); extreme +-30", "float", _moderate, extreme_value=30.0),
    "logvar": Domain("log-variances, U(-2, 2); extreme +-30 (e^30 ~ 1e13 is finite in float32)", "float",
                     _moderate, extreme_value=30.0),
    "data": Domain("real data, 1.5*N(0,1); extreme +-30", "float", _data, extreme_value=30.0),
    "probabilities": Domain("Bernoulli targets in [0, 1], ~30% exactly 0 or 1", "float", _probabilities,
                            extreme=False, bounds=(0.0, 1.0), invalid=(-0.25, 1.25, float("nan"))),
    "log_weights": Domain("log importance weights, N(-5, 9) plus ~10% in U(-60, 20); extreme +-1e4", "float",
                          _log_weights),
    "timesteps": Domain("int64 timesteps in [0, T) of the schedule, 0 and T-1 included", "int", _timesteps,
                        extreme=False),
    "levels": Domain("data on the 2^bits-level grid of [-1, 1], ~30% at the edge levels", "float", _levels,
                     extreme=False, bounds=(-1.0, 1.0), invalid=(1.5, float("nan"))),
    "unit_box": Domain("data in [-1, 1], U(-1, 1)", "float", _unit_box, extreme=False, bounds=(-1.0, 1.0),
                       invalid=(-1.5, float("nan"))),
    "sample_weights": Domain("per-sample loss weights, U(0, 2)", "float", _sample_weights, extreme=False,
                             invalid=(-0.5, float("nan"))),
}  # fmt: skip


# ============================================================================= sizes and inputs

# Odd shapes every native/torch comparison runs on (Liger-style odd sizes, B = 1, 3-D trailing).
ODD_SIZES: tuple[dict[str, Any], ...] = (
    dict(B=41, Br=41, Bf=13, Bl=41, Bu=13, Ba=41, Bb=13, K=7, F=7, O=41, I=7, **{"...": (7,), "...2": (7,)}),
    dict(B=1, Br=1, Bf=1, Bl=1, Bu=1, Ba=1, Bb=1, K=2, F=1, O=1, I=1, **{"...": (), "...2": ()}),
    dict(B=3, Br=3, Bf=2, Bl=3, Bu=5, Ba=3, Bb=2, K=4, F=5, O=3, I=5, **{"...": (3, 2, 5), "...2": (2, 3)}),
)

BATCH_SYMBOLS = ("B", "Br", "Bf", "Bl", "Bu", "Ba", "Bb")
DIM_SYMBOLS = ("K", "F", "O", "I")
GROUP_SYMBOLS = ("...", "...2")


def draw_sizes(rng: np.random.Generator, max_batch: int = 6, max_dim: int = 4, max_trailing: int = 3) -> dict:
    """Random sizes for every symbol (small by default: finite differences are per element)."""
    sizes: dict[str, Any] = {s: int(rng.integers(1, max_batch + 1)) for s in BATCH_SYMBOLS}
    sizes.update({s: int(rng.integers(1, max_dim + 1)) for s in DIM_SYMBOLS})
    sizes["K"] = max(2, sizes["K"])
    for g in GROUP_SYMBOLS:
        sizes[g] = tuple(int(d) for d in rng.integers(1, max_dim + 1, size=rng.integers(0, max_trailing + 1)))
    return sizes


def resolve_shapes(
    record: OpRecord, sizes: Mapping[str, Any], variant: Variant = DEFAULT
) -> dict[str, tuple]:
    """The shape of every array argument under ``sizes`` (with the variant's ``same`` ties)."""
    sizes = dict(sizes)
    for sym, other in variant.same:
        sizes[sym] = sizes[other]
    shapes = {}
    for a in record.args:
        shape: list[int] = []
        for s in a.shape:
            if s.isdigit():
                shape.append(int(s))
            else:
                shape.extend(sizes[s] if s.startswith("...") else (sizes[s],))
        shapes[a.name] = tuple(int(d) for d in shape)
    return shapes


def _push_from(x: np.ndarray, point: float | np.ndarray, margin: float) -> np.ndarray:
    """Move entries within ``margin`` of ``point`` to ``point +- 5*margin`` (sign kept)."""
    d = x - point
    near = np.abs(d) < margin
    return np.where(near, point + np.where(d >= 0, 5.0, -5.0) * margin, x)


def _avoid_norm_kinks(g: np.ndarray, center: float, margin: float) -> np.ndarray:
    """Rescale samples whose norm is within ``margin`` of ``center`` or of 0 to norm max(center, 0) + 0.3
    (samples that are exactly 0 stay: the gradient there is defined, and central differences agree)."""
    flat = g.reshape(g.shape[0], -1).copy()
    for b in range(flat.shape[0]):
        n = float(np.linalg.norm(flat[b]))
        if n != 0.0 and (abs(n - center) < margin or n < margin):
            flat[b] *= (max(center, 0.0) + 0.3) / n
    return flat.reshape(g.shape)


def make_inputs(
    record: OpRecord,
    rng: np.random.Generator,
    dtype: Any = np.float64,
    sizes: Mapping[str, Any] | None = None,
    variant: Variant = DEFAULT,
    *,
    extreme: bool = False,
    interior: bool = False,
) -> tuple[np.ndarray, ...]:
    """The array inputs of ``record.at(variant)`` drawn from their domains, in argument order.

    Floating arguments are generated in float64, moved away from kinks by
    ``KINK_MARGIN`` (if the op has any), then cast to ``dtype``; integer
    arguments (labels) are int64.  ``extreme=True`` sets about a quarter of the
    entries of every floating argument whose domain allows it to +-``extreme_value``.
    ``interior=True`` moves entries of a bounded domain ``KINK_MARGIN`` inside it
    (for checks that step both ways, e.g. ``torch.autograd.gradcheck``).
    """
    record = record.at(variant)
    if sizes is None:
        sizes = draw_sizes(rng)
    sizes = dict(sizes)
    for sym, lo, hi in record.size_limits:  # an empty batch stays empty (the bad-input tests ask)
        if sym in sizes and sizes[sym] > 0:
            sizes[sym] = min(max(sizes[sym], lo), hi)
    for sym, other in variant.same:
        sizes[sym] = sizes[other]
    shapes = resolve_shapes(record, sizes, variant)
    hyper = {**_defaults(record), **variant.kwargs}
    arrays: dict[str, np.ndarray] = {}
    for a in record.args:
        dom = DOMAINS[a.domain]
        x = dom.make(rng, shapes[a.name], sizes, hyper)
        if extreme and dom.extreme and dom.kind == "float" and x.size:
            idx = _few(rng, x.size, 0.25)
            x = x.copy()
            x.flat[idx] = rng.choice([-dom.extreme_value, dom.extreme_value], size=idx.size)
        if interior and dom.bounds is not None:
            x = np.clip(x, dom.bounds[0] + KINK_MARGIN, dom.bounds[1] - KINK_MARGIN)
        for k in a.kinks:
            x = _push_from(x, k, KINK_MARGIN)
        arrays[a.name] = x
    if record.norm_kink is not None:
        arrays[record.norm_kink] = _avoid_norm_kinks(
            arrays[record.norm_kink], float(hyper["center"]), KINK_MARGIN
        )
    for first, second in record.kink_pairs:
        arrays[first] = _push_from(arrays[first], arrays[second], KINK_MARGIN)
    out = []
    for a in record.args:
        x = arrays[a.name]
        out.append(x.astype(np.int64) if DOMAINS[a.domain].kind == "int" else np.asarray(x, dtype=dtype))
    return tuple(out)


def extreme_value(record: OpRecord, name: str) -> float | None:
    """The magnitude ``make_inputs(extreme=True)`` injects into argument ``name`` (None: none)."""
    dom = DOMAINS[record.arg(name).domain]
    return dom.extreme_value if dom.extreme and dom.kind == "float" else None


def grad_scale(
    record: OpRecord, name: str, inputs: tuple, reduction: str | None, expected: Any, upstream: Any = 1.0
) -> float:
    r"""The magnitude the rounding error of the gradient w.r.t. ``name`` is proportional to.

    ``max(1, max |expected|)`` in general; for an argument listed in ``bounded_sums`` at
    least :math:`S = n \max|w|` (:math:`\max|w|` for ``'mean'``), n the size of the symbol:
    each entry sums n terms of magnitude :math:`\le |w|` that may cancel, so a correct
    computation errs by ~eps * S however small the sum (the GMM's mixing-logit gradient
    :math:`\sum_n (r_{nk} - \pi_k)` of a component with :math:`\pi_k \approx 1`).
    """
    e = np.asarray(expected, dtype=np.float64)
    base = max(1.0, float(np.abs(e[np.isfinite(e)]).max(initial=0.0)))
    for arg, sym in record.bounded_sums:
        if arg != name:
            continue
        holder = next(i for i, a in enumerate(record.args) if sym in a.shape)
        n = int(np.shape(inputs[holder])[record.args[holder].shape.index(sym)])
        w = float(np.max(np.abs(np.asarray(upstream, dtype=np.float64)), initial=0.0))
        base = max(base, w * (1 if reduction == "mean" else n))
    return base


def capped(record: OpRecord, sizes: Mapping[str, Any]) -> dict[str, Any]:
    """``sizes`` with the record's ``caps`` applied (large-input tests of ops whose reference is costly)."""
    out = dict(sizes)
    for sym, cap in record.caps:
        out[sym] = min(out[sym], cap)
    return out


def _defaults(record: OpRecord) -> dict[str, Any]:
    import inspect

    sig = inspect.signature(record.reference)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def call_kwargs(record: OpRecord, variant: Variant = DEFAULT, reduction: str | None = None) -> dict[str, Any]:
    """Keyword arguments of one call: the variant's hyperparameters, then ``reduction`` if the op has one."""
    kw = variant.kwargs
    if reduction is not None:
        if not record.reductions:
            raise ValueError(f"{record.name} takes no reduction")
        kw["reduction"] = reduction
    return kw


def cases(records: tuple[OpRecord, ...] | None = None) -> Iterator[tuple[OpRecord, Variant, str | None]]:
    """Every (record specialised to the variant, variant, reduction); reduction None for ops without one."""
    for r in RECORDS if records is None else records:
        for v in r.variants:
            spec = r.at(v)
            for red in r.reductions or (None,):
                yield spec, v, red


# ============================================================================= the GAN family

_ALL = ("mean", "sum", "none")
_TWO = ("mean", "sum")
_MODES = ("nonsaturating", "minimax")
_DIVS = tuple(_gan.F_DIVERGENCES)
# exp-based f-divergences: e^{+-v} overflows at |v| = 1e4 (the exact value is out of range).
_FGAN_OVERFLOWS = ("kl", "reverse_kl", "squared_hellinger")


def _rec(name: str, args, diff, reductions, tag, **kw) -> OpRecord:
    return OpRecord(
        name=name,
        family="gan",
        reference=getattr(_gan, name),
        reference_backward=getattr(_gan, name + "_backward"),
        args=tuple(args),
        differentiable=tuple(diff),
        reductions=tuple(reductions),
        derivation=f"gan.md#GAN.{tag}",
        **kw,
    )


def _two(domain: str, real: str, fake: str, kinks=((), ())) -> tuple[Arg, Arg]:
    return Arg(real, domain, ("Br", "..."), kinks[0]), Arg(fake, domain, ("Bf", "..."), kinks[1])


RECORDS: tuple[OpRecord, ...] = (
    _rec("gan_d_loss", _two("logits", "real_logits", "fake_logits"), ("real_logits", "fake_logits"), _TWO, 3,
         loose=("...",)),
    _rec("gan_g_loss", [Arg("fake_logits", "logits", ("B", "..."))], ("fake_logits",), _ALL, 7,
         hypers=(Hyper("mode", "choice", _MODES),), variants=tuple(_v(mode=m) for m in _MODES)),
    _rec("lsgan_d_loss", _two("outputs", "real_out", "fake_out"), ("real_out", "fake_out"), _TWO, 8,
         hypers=(Hyper("a", "real"), Hyper("b", "real")), variants=(DEFAULT, _v(a=-1.0, b=0.5)), loose=("...",)),
    _rec("lsgan_g_loss", [Arg("fake_out", "outputs", ("B", "..."))], ("fake_out",), _ALL, 8,
         hypers=(Hyper("c", "real"),), variants=(DEFAULT, _v(c=0.25))),
    _rec("wgan_critic_loss", _two("scores", "real_scores", "fake_scores"), ("real_scores", "fake_scores"), _TWO, 9,
         loose=("...",)),
    _rec("wgan_g_loss", [Arg("fake_scores", "scores", ("B", "..."))], ("fake_scores",), _ALL, 9),
    _rec("hinge_d_loss", _two("scores", "real_scores", "fake_scores", kinks=((1.0,), (-1.0,))),
         ("real_scores", "fake_scores"), _TWO, 10, loose=("...",)),
    _rec("hinge_g_loss", [Arg("fake_scores", "scores", ("B", "..."))], ("fake_scores",), _ALL, 10),
    *(
        _rec(name, _two("logits", "real_logits", "fake_logits"), ("real_logits", "fake_logits"), _TWO, 11,
             hypers=(Hyper("average", "flag"),), loose=("...",),
             # RSGAN pairs real and fake element by element: same batch and trailing dims.
             variants=(_v(average=True), _v(average=False, same=(("Bf", "Br"),), loose=())))
        for name in ("relativistic_d_loss", "relativistic_g_loss")
    ),
    _rec("gradient_penalty_from_grads", [Arg("grads", "grads", ("B", "..."))], ("grads",), _ALL, 12,
         hypers=(Hyper("lambda_", "real"), Hyper("center", "real"), Hyper("one_sided", "flag")),
         variants=(DEFAULT, _v(one_sided=True), _v(lambda_=2.5, center=0.0), _v(lambda_=0.5, center=2.0, one_sided=True)),
         norm_kink="grads"),
    _rec("r1_penalty_from_grads", [Arg("grads", "grads", ("B", "..."))], ("grads",), _ALL, 13,
         hypers=(Hyper("gamma", "real"),), variants=(DEFAULT, _v(gamma=0.3))),
    _rec("feature_matching_loss", [Arg("real_features", "features", ("Br", "F")),
                                   Arg("fake_features", "features", ("Bf", "F"))],
         ("real_features", "fake_features"), (), 14),
    _rec("ssgan_critic_loss", [Arg("labeled_logits", "class_logits", ("Bl", "K")), Arg("labels", "labels", ("Bl",)),
                               Arg("unlabeled_logits", "class_logits", ("Bu", "K")),
                               Arg("fake_logits", "class_logits", ("Bf", "K"))],
         ("labeled_logits", "unlabeled_logits", "fake_logits"), _TWO, 15),
    _rec("ssgan_g_loss", [Arg("fake_logits", "class_logits", ("B", "K"))], ("fake_logits",), _ALL, 15),
    _rec("l1_loss", [Arg("input", "images", ("B", "...")), Arg("target", "images", ("B", "..."))],
         ("input", "target"), _ALL, 16, kink_pairs=(("input", "target"),)),
    _rec("pix2pix_g_loss", [Arg("fake_logits", "logits", ("B", "...")), Arg("generated", "images", ("B", "...2")),
                            Arg("target", "images", ("B", "...2"))],
         ("fake_logits", "generated", "target"), _ALL, 16, hypers=(Hyper("lambda_l1", "real"),),
         variants=(DEFAULT, _v(lambda_l1=3.0)), kink_pairs=(("generated", "target"),)),
    _rec("cycle_consistency_loss", [Arg("real_a", "images", ("Ba", "...")), Arg("rec_a", "images", ("Ba", "...")),
                                    Arg("real_b", "images", ("Bb", "...2")), Arg("rec_b", "images", ("Bb", "...2"))],
         ("real_a", "rec_a", "real_b", "rec_b"), _TWO, 16, hypers=(Hyper("lambda_cyc", "real"),),
         variants=(DEFAULT, _v(lambda_cyc=0.5)), kink_pairs=(("rec_a", "real_a"), ("rec_b", "real_b"))),
    _rec("spectral_norm_sigma", [Arg("W", "weight", ("O", "I")), Arg("u", "vector", ("O",))], ("W",), (), 17,
         hypers=(Hyper("n_iters", "int"), Hyper("eps", "real")),
         # The backward holds u, v constant (as torch.nn.utils.spectral_norm): it is the
         # derivative of sigma only once the power iteration has converged (n_iters=30 on
         # a W with spectral gap >= 2), not after one step.
         variants=(_v(n_iters=1, fd=False), _v(n_iters=30)),
         extreme_finite=False, has_native=False, value_index=0),
    _rec("fgan_d_loss", _two("scores", "real_v", "fake_v"), ("real_v", "fake_v"), _TWO, 18,
         hypers=(Hyper("divergence", "choice", _DIVS),), loose=("...",),
         variants=tuple(_v(divergence=d, extreme_finite=d not in _FGAN_OVERFLOWS) for d in _DIVS)),
    _rec("fgan_g_loss", [Arg("fake_v", "scores", ("B", "..."))], ("fake_v",), _ALL, 18,
         hypers=(Hyper("divergence", "choice", _DIVS), Hyper("mode", "choice", _MODES)),
         variants=tuple(_v(divergence=d, mode=m, extreme_finite=d not in _FGAN_OVERFLOWS)
                        for d in _DIVS for m in _MODES)),
    _rec("jsd_estimate", _two("logits", "real_logits", "fake_logits"), ("real_logits", "fake_logits"), (), 6,
         loose=("...",)),
)  # fmt: skip


# ============================================================================= the VAE family


def _vrec(name: str, args, diff, reductions, tag, **kw) -> OpRecord:
    return OpRecord(
        name=name,
        family="vae",
        reference=getattr(_vae, name),
        reference_backward=getattr(_vae, name + "_backward", None),
        args=tuple(args),
        differentiable=tuple(diff),
        reductions=tuple(reductions),
        derivation=f"vae.md#VAE.{tag}",
        **kw,
    )


def _lv(name: str, shape: tuple[str, ...], **kw) -> Arg:
    """A log-variance argument that broadcasts: per element, per feature or 0-d."""
    return Arg(name, "logvar", shape, broadcast=True, **kw)


_GMM_ARGS = (
    Arg("x", "data", ("B", "F")),
    Arg("logits", "logits", ("K",)),
    Arg("means", "mean", ("K", "F")),
    Arg("logvars", "logvar", ("K", "F")),
)
# The reference forms the (N, K, D) array: the large-input tests keep K small.
_GMM_CAPS = (("K", 5),)
_RECON_LOGVAR = Arg("recon_logvar", "logvar", ("...",), broadcast=True, optional=True, keyword=True)

VAE_RECORDS: tuple[OpRecord, ...] = (
    _vrec("gaussian_kl", [Arg("mu", "mean", ("B", "...")), Arg("logvar", "logvar", ("B", "..."))],
          ("mu", "logvar"), _ALL, 4),
    _vrec("normal_kl", [Arg("mean1", "mean", ("B", "..."), broadcast=True), _lv("logvar1", ("B", "...")),
                        Arg("mean2", "mean", ("B", "..."), broadcast=True), _lv("logvar2", ("B", "..."))],
          ("mean1", "logvar1", "mean2", "logvar2"), (), 5, elementwise=True,
          # NumPy broadcasting: (B, 1), (F,), (B, F) and 0-d give a (B, F) value
          variants=(DEFAULT, _v(args=(Arg("mean1", "mean", ("B", "1"), broadcast=True), _lv("logvar1", ("F",)),
                                      Arg("mean2", "mean", ("B", "F"), broadcast=True), _lv("logvar2", ()))))),
    _vrec("bernoulli_nll", [Arg("logits", "logits", ("B", "...")), Arg("x", "probabilities", ("B", "..."))],
          ("logits", "x"), _ALL, 6),
    _vrec("gaussian_nll", [Arg("mean", "mean", ("B", "...")), Arg("x", "data", ("B", "...")),
                           _lv("logvar", ("B", "..."))],
          ("mean", "x", "logvar"), _ALL, 7,
          # per element, one learned scalar, per feature (the last: the non-contiguous tests use it)
          variants=(DEFAULT, _v(args=(_lv("logvar", ()),)), _v(args=(_lv("logvar", ("...",)),)))),
    _vrec("negative_elbo", [Arg("recon", "logits", ("B", "...")), Arg("x", "probabilities", ("B", "...")),
                            Arg("mu", "mean", ("B", "...2")), Arg("logvar", "logvar", ("B", "...2")), _RECON_LOGVAR],
          ("recon", "mu", "logvar", "recon_logvar"), _ALL, 8,
          hypers=(Hyper("beta", "real", low=0.0), Hyper("likelihood", "choice", ("bernoulli", "gaussian"))),
          # recon_logvar None (unit variance), per element, per feature; beta 0 (no rate term) to 4
          variants=(DEFAULT, _v(beta=0.25, likelihood="bernoulli"), _v(beta=4.0, likelihood="gaussian"),
                    _v(beta=2.5, likelihood="gaussian",
                       args=(dataclasses.replace(_RECON_LOGVAR, shape=("B", "...")),)),
                    _v(beta=0.0, likelihood="gaussian", args=(_RECON_LOGVAR,))),
          rejects=((_v(likelihood="bernoulli", args=(_RECON_LOGVAR,)), "recon_logvar"),)),
    _vrec("iwae_bound", [Arg("log_weights", "log_weights", ("B", "K"))], ("log_weights",), _ALL, 10),
    _vrec("gmm_log_likelihood", _GMM_ARGS, ("x", "logits", "means", "logvars"), _ALL, 11, caps=_GMM_CAPS,
          bounded_sums=(("logits", "B"),)),  # sum_n w_n (r_nk - pi_k), |r - pi| <= 1
    _vrec("gmm_responsibilities", _GMM_ARGS, (), (), 12, caps=_GMM_CAPS),
)  # fmt: skip

RECORDS = RECORDS + VAE_RECORDS


# ============================================================================= the diffusion family

# Short schedules keep the tests cheap; the cosine one reaches alpha_bar ~ 1e-5 at its end (beta
# clipped at 0.999), the linear one starts at beta = 1e-4 (alpha_bar ~ 1, snr ~ 1e4).
LINEAR_SCHEDULE = _dif.DiffusionSchedule(_dif.linear_betas(40, 1e-4, 0.2))
COSINE_SCHEDULE = _dif.DiffusionSchedule(_dif.cosine_betas(25))
_SCHEDULE = Hyper("schedule", "schedule")
_SCHEDULES = (_v(schedule=COSINE_SCHEDULE), _v(schedule=LINEAR_SCHEDULE))


def _drec(name: str, args, diff, reductions, tag, **kw) -> OpRecord:
    return OpRecord(
        name=name,
        family="diffusion",
        reference=getattr(_dif, name),
        reference_backward=getattr(_dif, name + "_backward", None),
        args=tuple(args),
        differentiable=tuple(diff),
        reductions=tuple(reductions),
        derivation=f"diffusion.md#DIF.{tag}",
        **kw,
    )


_T = Arg("t", "timesteps", ("B",))
_WEIGHTS = Arg("weights", "sample_weights", ("B",), optional=True, keyword=True)
_V = Arg("model_log_variance", "unit_box", ("B", "..."), optional=True, keyword=True)


def _linear_rec(name, first, second, tag, first_domain="data"):
    return _drec(
        name,
        [Arg(first, first_domain, ("B", "...")), _T, Arg(second, "data", ("B", "..."))],
        (first, second),
        (),
        tag,
        hypers=(_SCHEDULE,),
        variants=_SCHEDULES,
        elementwise=True,
    )


DIFFUSION_RECORDS: tuple[OpRecord, ...] = (
    _linear_rec("q_sample", "x0", "noise", 2),
    _linear_rec("v_target", "x0", "noise", 14),
    _linear_rec("predict_x0_from_eps", "x_t", "eps", 7),
    _linear_rec("posterior_mean_from_eps", "x_t", "eps", 7),
    _drec("q_posterior", [Arg("x0", "data", ("B", "...")), Arg("x_t", "data", ("B", "...")), _T], ("x0", "x_t"),
          (), 3, hypers=(_SCHEDULE,), variants=_SCHEDULES, elementwise=True, value_index=0),
    _drec("eps_mse_loss", [Arg("eps_pred", "data", ("B", "...")), Arg("eps", "data", ("B", "...")), _WEIGHTS],
          ("eps_pred", "eps"), _ALL, 12, variants=(DEFAULT, _v(args=(_WEIGHTS,)))),
    _drec("diffusion_mse_loss", [Arg("pred", "data", ("B", "...")), Arg("x0", "data", ("B", "...")),
                                 Arg("noise", "data", ("B", "...")), _T, _WEIGHTS],
          ("pred",), _ALL, 12, hypers=(_SCHEDULE, Hyper("prediction", "choice", _dif.PREDICTIONS)),
          variants=(_v(schedule=COSINE_SCHEDULE, prediction="eps"),
                    _v(schedule=LINEAR_SCHEDULE, prediction="x0", args=(_WEIGHTS,)),
                    _v(schedule=COSINE_SCHEDULE, prediction="v", args=(_WEIGHTS,)))),
    _drec("vlb_term", [Arg("x0", "unit_box", ("B", "...")), Arg("x_t", "data", ("B", "...")), _T,
                       Arg("eps_pred", "data", ("B", "...")), _V],
          ("eps_pred", "model_log_variance"), _ALL, 4, hypers=(_SCHEDULE, Hyper("bits", "int")),
          # (the linear schedule's beta_0 = 1e-4 makes the t = 0 decoder bin ~100 standard deviations
          # wide: values ~1e4, beyond what gradcheck's central differences resolve; the native tests
          # cover it with the fixed variance)
          variants=(_v(schedule=LINEAR_SCHEDULE), _v(schedule=COSINE_SCHEDULE, bits=5, args=(_V,)),
                    _v(schedule=COSINE_SCHEDULE,
                       args=(dataclasses.replace(_V, shape=("...",), broadcast=True),)))),
    _drec("prior_kl", [Arg("x0", "data", ("B", "..."))], ("x0",), _ALL, 5, hypers=(_SCHEDULE,),
          variants=_SCHEDULES),
    _drec("discretized_gaussian_log_likelihood",
          [Arg("x", "levels", ("B", "..."), broadcast=True), Arg("means", "mean", ("B", "..."), broadcast=True),
           Arg("log_scales", "logvar", ("B", "..."), broadcast=True)],
          ("means", "log_scales"), (), 9, elementwise=True,
          hypers=(Hyper("bits", "int"), Hyper("cdf", "choice", ("exact", "tanh"))),
          # tanh: 1 - cdf in the upper tail cancels (the approximation's own conditioning), so central
          # differences of the forward are noise there; its derivative is checked by the identity tests
          variants=(DEFAULT, _v(bits=3), _v(cdf="tanh", fd=False),
                    _v(bits=4, args=(Arg("log_scales", "logvar", ("...",), broadcast=True),)))),
    _drec("vdm_continuous_loss", [Arg("eps", "data", ("B", "...")), Arg("eps_pred", "data", ("B", "...")),
                                  Arg("dgamma_dt", "mean", ("B",))],
          ("eps", "eps_pred", "dgamma_dt"), _ALL, 16),
    _drec("vdm_discrete_loss", [Arg("eps", "data", ("B", "...")), Arg("eps_pred", "data", ("B", "...")),
                                Arg("gamma_t", "mean", ("B",)), Arg("gamma_s", "mean", ("B",))],
          ("eps", "eps_pred", "gamma_t", "gamma_s"), _ALL, 17, hypers=(Hyper("T", "int"),),
          variants=(_v(T=1000), _v(T=3))),
    _drec("to_bits_per_dim", [Arg("nats", "data", ("B", "..."), broadcast=True)], ("nats",), (), 19, has_native=False,
          hypers=(Hyper("num_dims", "int"),), variants=(_v(num_dims=3072),), elementwise=True),
)  # fmt: skip

RECORDS = RECORDS + DIFFUSION_RECORDS


# ============================================================================= divergences and kernels


def _divrec(name: str, args, diff, reductions, tag, **kw) -> OpRecord:
    return OpRecord(
        name=name,
        family="divergence",
        reference=getattr(_div, name),
        reference_backward=getattr(_div, name + "_backward", None),
        args=tuple(args),
        differentiable=tuple(diff),
        reductions=tuple(reductions),
        derivation=f"divergence.md#DIV.{tag}",
        **kw,
    )


DIVERGENCE_RECORDS: tuple[OpRecord, ...] = (
    # e^l overflows for l > 88.7 in float32 (the ratio itself is out of range): no extreme inputs
    _divrec("density_ratio_from_logits", [Arg("logits", "scores", ("B", "..."), broadcast=True)], ("logits",), (),
            1, elementwise=True, extreme_finite=False),
    _divrec("mmd2", [Arg("x", "features", ("Br", "F")), Arg("y", "features", ("Bf", "F"))], ("x", "y"), (), 9,
            hypers=(Hyper("kernel", "choice", _div.KERNELS), Hyper("estimator", "choice", _div.MMD_ESTIMATORS),
                    Hyper("bandwidths", "bandwidths")),
            # the blocked (D > 4) body is covered by tests/test_mmd.py at D = 9, not at +-1e4 entries
            size_limits=(("Br", 2, 10**9), ("Bf", 2, 10**9), ("F", 1, 4)),
            variants=(_v(kernel="rbf", bandwidths=(1.0, 2.5), estimator="unbiased"),
                      _v(kernel="imq", bandwidths=(1.5,), estimator="biased"),
                      # the cubic kernel of 1e4-sized features is ~1e24: the unbiased estimator's float32
                      # differences of such terms are noise (finite, not accurate): no extreme inputs
                      _v(kernel="polynomial", estimator="unbiased", extreme_finite=False),
                      _v(kernel="energy", estimator="biased"),
                      _v(kernel="rbf", bandwidths=(2.0,), estimator="linear", same=(("Bf", "Br"),)),
                      # the median heuristic moves with the data: central differences see it, the
                      # gradient (by definition) does not
                      _v(kernel="rbf", estimator="unbiased", fd=False))),
)  # fmt: skip

RECORDS = RECORDS + DIVERGENCE_RECORDS

# Reference functions with no record, and why (a test checks this list is complete).
NOT_REGISTERED: dict[str, str] = {
    "gmm_em_step": "reference only (no native or torch layer, no gradient); checked by "
    "tests/test_vae_identities.py (the log-likelihood never decreases)",
    "linear_betas": "a schedule (no array input); torch layer checked by tests/test_torch_diffusion.py",
    "cosine_betas": "a schedule (no array input); torch layer checked by tests/test_torch_diffusion.py",
    "snr_weights": "per-sample weights of integer timesteps (no float input, no gradient); torch layer "
    "checked against the reference by tests/test_torch_diffusion.py",
    "low_discrepancy_times": "times from scalars (no array input); torch layer checked by "
    "tests/test_torch_diffusion.py",
    "full_bound": "a loop over vlb_term and prior_kl with a model callback; checked by "
    "tests/test_diffusion_identities.py and tests/test_torch_diffusion.py",
    "median_bandwidth": "a hyperparameter (a Python float, no gradient); every layer checked against a "
    "brute-force median by tests/test_divergence_identities.py and tests/test_mmd.py",
    "kid": "(mean, std) over random subsets, Python floats (no gradient); checked against the dense "
    "polynomial MMD by tests/test_divergence_identities.py and tests/test_mmd.py",
    "f_divergence": "reference only (exact D_f of discrete distributions, the oracle of the f-GAN "
    "bounds); checked by tests/test_divergence_identities.py",
}

_BY_NAME = {r.name: r for r in RECORDS}


def by_name(name: str) -> OpRecord:
    return _BY_NAME[name]


def _check_registry() -> None:
    """Cheap self-consistency of the table, run at import: a broken record fails loudly."""
    for r in RECORDS:
        problems = []
        if not set(r.differentiable) <= set(r.arg_names):
            problems.append("differentiable names an unknown argument")
        if any(a.domain not in DOMAINS for a in r.args):
            problems.append("unknown domain")
        for v in (*r.variants, *(rv for rv, _ in r.rejects)):
            if not set(v.kwargs) <= {h.name for h in r.hypers}:
                problems.append(f"variant {v.id} sets an undeclared hyperparameter")
            if not {a.name for a in v.args} <= set(r.arg_names):
                problems.append(f"variant {v.id} replaces an unknown argument")
        for arg, sym in r.bounded_sums:
            if arg not in r.differentiable or not any(sym in a.shape for a in r.args):
                problems.append(f"bounded_sums ({arg}, {sym}): not a differentiable argument and a symbol")
        if r.reference_backward is None and r.differentiable:
            problems.append("differentiable arguments but no reference backward")
        seen_optional = False
        for a in r.args:  # absent optional arrays must be trailing (calls pass the others positionally)
            if seen_optional and not a.optional:
                problems.append(f"optional arguments must come last ({a.name})")
            seen_optional = seen_optional or a.optional
        if problems:
            raise ValueError(f"registry record {r.name}: " + "; ".join(problems))


_check_registry()
