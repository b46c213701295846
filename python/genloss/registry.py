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
  (possibly empty), e.g. ``('B', '...')`` = batch first, any trailing dims.

Arguments that share a symbol get the same size.  Two-population ops use
separate batch symbols (``'Br'``/``'Bf'``) and share their trailing dims; the
symbols an op does NOT require to match (it would accept them different) are
listed in ``loose``.

This module imports only NumPy and the reference: no pytest, no torch, no native
module (those are looked up lazily, so ``genloss verify`` works without them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .reference import gan as _gan

__all__ = [
    "DOMAINS",
    "EXTREME",
    "KINK_MARGIN",
    "ODD_SIZES",
    "RECORDS",
    "Arg",
    "Hyper",
    "OpRecord",
    "Variant",
    "by_name",
    "call_kwargs",
    "cases",
    "draw_sizes",
    "extreme_ok",
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


@dataclass(frozen=True)
class Hyper:
    """A non-array argument: ``kind`` is 'real' (finite float), 'flag' (bool), 'choice' or 'int'."""

    name: str
    kind: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Variant:
    """A setting of the hyperparameters to cover, with what it changes for the tests.

    ``extreme_finite``: None inherits the record's flag; False where the math itself
    overflows at |x| = 1e4 (exp-based f-divergences).  ``fd``: False where the
    backward is by design not the derivative of the forward (spectral norm with an
    unconverged power iteration).  ``same``: pairs (symbol, symbol it must equal),
    e.g. RSGAN pairs real and fake element by element.  ``loose``: None inherits the
    record's; else the symbols this variant does not require to match.
    """

    params: tuple[tuple[str, Any], ...] = ()
    extreme_finite: bool | None = None
    fd: bool = True
    same: tuple[tuple[str, str], ...] = ()
    loose: tuple[str, ...] | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def id(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.params) or "default"


def _v(extreme_finite: bool | None = None, fd: bool = True, same=(), loose=None, **params: Any) -> Variant:
    return Variant(tuple(params.items()), extreme_finite, fd, tuple(same), loose)


DEFAULT = Variant()


@dataclass(frozen=True)
class OpRecord:
    """Everything the generic tests need to know about one operation."""

    name: str
    family: str
    reference: Callable[..., Any]
    reference_backward: Callable[..., Any]
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
    value_index: int | None = None  # forward returns a tuple; the loss-like value is this element
    torch_name: str = ""  # '' = name
    notes: str = ""

    # -- entry points in the other layers (imported lazily) -------------------
    @property
    def native(self) -> Callable[..., Any] | None:
        """``genloss.native.<name>`` or None (no native version; imports the compiled module)."""
        if not self.has_native:
            return None
        return getattr(importlib.import_module("genloss.native"), self.name)

    @property
    def torch_op_name(self) -> str:
        return self.torch_name or self.name

    @property
    def torch(self) -> Callable[..., Any]:
        """``genloss.torch.<name>`` (imports torch)."""
        return getattr(importlib.import_module("genloss.torch"), self.torch_op_name)

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
    """Whether inputs of magnitude 1e4 must give a finite value and finite gradients."""
    return record.extreme_finite if variant.extreme_finite is None else variant.extreme_finite


# ============================================================================= input domains


@dataclass(frozen=True)
class Domain:
    description: str
    kind: str  # 'float' | 'int'
    make: Callable[[np.random.Generator, tuple[int, ...], Mapping[str, Any], Mapping[str, Any]], np.ndarray]
    extreme: bool = True  # whether ``extreme=True`` injects +-1e4 into this argument


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
}


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
) -> tuple[np.ndarray, ...]:
    """Positional array inputs of ``record`` drawn from its domains, in argument order.

    Floating arguments are generated in float64, moved away from kinks by
    ``KINK_MARGIN`` (if the op has any), then cast to ``dtype``; integer
    arguments (labels) are int64.  ``extreme=True`` sets about a quarter of the
    entries of every floating argument whose domain allows it to +-1e4.
    """
    if sizes is None:
        sizes = draw_sizes(rng)
    sizes = dict(sizes)
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
            x.flat[idx] = rng.choice([-EXTREME, EXTREME], size=idx.size)
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
    """Every (record, variant, reduction) triple; reduction None for ops without one."""
    for r in RECORDS if records is None else records:
        for v in r.variants:
            for red in r.reductions or (None,):
                yield r, v, red


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
        for v in r.variants:
            if not set(v.kwargs) <= {h.name for h in r.hypers}:
                problems.append(f"variant {v.id} sets an undeclared hyperparameter")
        if problems:
            raise ValueError(f"registry record {r.name}: " + "; ".join(problems))


_check_registry()
