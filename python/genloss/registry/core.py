"""The record machinery: argument, hyperparameter, variant and record types, one record
factory, and the input/size helpers every generic test uses."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .domains import DOMAINS, KINK_MARGIN, _few

ALL = ("mean", "sum", "none")  # the reductions of a per-sample loss
TWO = ("mean", "sum")  # ... of a two-population loss


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
    def layout_free(self) -> bool:
        """The op only sees each sample's non-batch entries as one flattened run (the library's
        convention for ``('B', '...')`` arrays): every array is ``(batch, '...')`` with the one
        trailing symbol, or one value per sample, none broadcasts, and it returns one result.
        A permutation of the non-batch dims applied to every such array alike then changes
        nothing but the order of each sample's sums, so the torch layer hands channels_last
        tensors over as permuted contiguous views instead of copying them (torch/_op.py)."""
        shapes = [tuple(a.shape) for a in self.args]
        return (
            self.value_index is None
            and not any(a.broadcast for a in self.args)
            and all(len(s) == 1 or (len(s) == 2 and s[1] == "...") for s in shapes)
            and any(len(s) == 2 for s in shapes)
        )

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


raw = _raw  # the reference function itself (its real signature), for the layers built from a record


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
    if records is None:
        from . import RECORDS  # the package's table (this module is imported first)

        records = RECORDS
    for r in records:
        for v in r.variants:
            spec = r.at(v)
            for red in r.reductions or (None,):
                yield spec, v, red


def record_factory(family: str, module: ModuleType, prefix: str) -> Callable[..., OpRecord]:
    """The one record factory: ``rec(name, args, differentiable, reductions, tag, **facts)`` for the
    ops of ``family``, whose reference (and ``<name>_backward``) live in ``module`` and whose
    derivation tags are ``<prefix>.<tag>`` in ``derivations/<family>.md``."""

    def rec(name: str, args: Any, diff: Any, reductions: Any, tag: int, **kw: Any) -> OpRecord:
        return OpRecord(
            name=name,
            family=family,
            reference=getattr(module, name),
            reference_backward=getattr(module, name + "_backward", None),
            args=tuple(args),
            differentiable=tuple(diff),
            reductions=tuple(reductions),
            derivation=f"{family}.md#{prefix}.{tag}",
            **kw,
        )

    return rec


# ============================================================================= verify cases
# Ops that do not fit the record model (several outputs, integer outputs, lists of arrays, metrics
# that return Python floats) still get ``genloss verify`` rows: a ``VerifyCase`` says how to draw
# their calls, what each output is compared with, and how to get the reference gradient.


@dataclass(frozen=True)
class Out:
    """One output of a verify case's op, in the order the op returns them (a dict result: by name).

    ``compare``: 'value' (within ``genloss.tolerances``, like a record's value) or 'equal' (bitwise:
    integer indices, counts).  ``grad``: the output carries a gradient (it gets a random upstream
    weight; the gradient of the weighted sum is compared).  ``scale``: ``(float64 arguments,
    expected) -> float``, the magnitude the output's rounding error is proportional to (default
    max(1, max |expected|), as ``_excess``), for outputs that cancel or carry a constant factor.
    """

    name: str
    compare: str = "value"
    grad: bool = False
    scale: Callable[[tuple, np.ndarray], float] | None = None


@dataclass(frozen=True)
class VerifyCase:
    """How ``genloss verify`` checks an op that has no record, on every backend.

    ``draw(rng)``: the calls to check, a list of ``(arguments, keyword arguments)``; an argument is a
    float64 or int64 NumPy array, a list of arrays (cast to the cell's dtype and backend), or any
    other value (passed as is).  ``reference``: the NumPy reference (float64 arguments), default
    ``genloss.reference.<family>.<name>``.  ``post(args, kwargs, outputs)``: maps every layer's raw
    outputs (the reference's too) to the compared ones, e.g. a permutation to its cost.
    ``differentiable``: positions of the arguments with a gradient (a list: each of its arrays);
    ``backward(args, kwargs, upstream)``: the reference's gradients of ``sum_o upstream_o * output_o``
    (``upstream`` aligned with ``outputs``, None where ``grad`` is False), flat, in the order of the
    differentiable arrays.  ``native(args, kwargs, upstream) -> (outputs, flat gradients)``: the
    native entry point adapted to that form (None: no native layer); ``native_cuda``: it takes CUDA
    tensors too.  ``torch``: the torch entry point, default ``genloss.torch.<name>`` (autograd gives
    its gradients); ``dtype_kw``: a keyword that receives the cell's torch dtype (an op whose output
    dtype is a parameter, not its inputs').  ``grad_scale(args, expected, upstream)``: as ``Out.scale``, for
    the gradients (their terms scale with the upstream weights).
    """

    name: str
    family: str
    draw: Callable[[np.random.Generator], list[tuple[tuple, dict[str, Any]]]]
    outputs: tuple[Out, ...]
    reference: Callable[..., Any]
    differentiable: tuple[int, ...] = ()
    backward: Callable[..., list] | None = None  # (args, kwargs, upstream)
    native: Callable[..., tuple[Any, list]] | None = None  # (args, kwargs, upstream)
    native_cuda: bool = False
    torch: Callable[..., Any] | None = None
    dtype_kw: str = ""
    post: Callable[..., tuple] | None = None  # (args, kwargs, outputs)
    grad_scale: Callable[[tuple, np.ndarray, list], float] | None = None
    notes: str = ""

    @property
    def torch_fn(self) -> Callable[..., Any]:
        """The torch entry point (imports ``genloss.torch``)."""
        if self.torch is not None:
            return self.torch
        return getattr(importlib.import_module("genloss.torch"), self.name)

    def outputs_of(self, result: Any) -> tuple:
        """An op's result as the tuple of ``outputs`` (a dict by name, a single array as a 1-tuple)."""
        if isinstance(result, Mapping):
            return tuple(result[o.name] for o in self.outputs)
        return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def case_factory(family: str, module: ModuleType) -> Callable[..., VerifyCase]:
    """``case(name, draw, outputs, **facts)`` for the ops of ``family`` whose reference is in ``module``."""

    def case(name: str, draw: Any, outputs: Any, **kw: Any) -> VerifyCase:
        kw.setdefault("reference", getattr(module, name))
        return VerifyCase(name=name, family=family, draw=draw, outputs=tuple(outputs), **kw)

    return case


def native_loss(name: str) -> Callable[[tuple, dict, list], tuple[Any, list]]:
    """The native ``(value, grads)`` form of a 0-d loss (gradients for an upstream of 1) as a verify
    case's ``native``: the gradients times the case's upstream weight."""

    def call(args: tuple, kwargs: dict, upstream: list) -> tuple[Any, list]:
        value, grads = getattr(importlib.import_module("genloss.native"), name)(*args, **kwargs)
        return (value,), [None if g is None else g * float(upstream[0]) for g in grads]

    return call


def native_value(name: str) -> Callable[[tuple, dict, list], tuple[Any, list]]:
    """A native op without gradient (its result as is) as a verify case's ``native``."""

    def call(args: tuple, kwargs: dict, upstream: list) -> tuple[Any, list]:
        return getattr(importlib.import_module("genloss.native"), name)(*args, **kwargs), []

    return call
