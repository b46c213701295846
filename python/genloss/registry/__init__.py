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

from . import diffusion as _diffusion
from . import divergence as _divergence
from . import flow as _flow
from . import gan as _gan_records
from . import metrics as _metrics
from . import quant as _quant
from . import vae as _vae
from .core import (  # noqa: F401  (the public names of the machinery)
    ALL,
    BATCH_SYMBOLS,
    DEFAULT,
    DIM_SYMBOLS,
    GROUP_SYMBOLS,
    ODD_SIZES,
    TWO,
    Arg,
    Hyper,
    OpRecord,
    Out,
    Variant,
    VerifyCase,
    call_kwargs,
    capped,
    cases,
    draw_sizes,
    extreme_ok,
    extreme_value,
    grad_scale,
    make_inputs,
    raw,
    record_factory,
    resolve_shapes,
)
from .diffusion import COSINE_SCHEDULE, LINEAR_SCHEDULE  # noqa: F401
from .domains import DOMAINS, EXTREME, KINK_MARGIN, Domain  # noqa: F401

__all__ = [
    "DOMAINS",
    "EXTREME",
    "KINK_MARGIN",
    "NOT_REGISTERED",
    "ODD_SIZES",
    "RECORDS",
    "VERIFY_CASES",
    "Arg",
    "Hyper",
    "OpRecord",
    "Out",
    "Variant",
    "VerifyCase",
    "by_name",
    "call_kwargs",
    "capped",
    "cases",
    "draw_sizes",
    "extreme_ok",
    "extreme_value",
    "grad_scale",
    "make_inputs",
    "raw",
    "resolve_shapes",
]


RECORDS: tuple[OpRecord, ...] = (
    _gan_records.RECORDS
    + _vae.RECORDS
    + _diffusion.RECORDS
    + _divergence.RECORDS
    + _flow.RECORDS
    + _quant.RECORDS
    + _metrics.RECORDS
)

# Ops with no record that ``genloss verify`` still checks on every backend (genloss.registry.core.VerifyCase).
VERIFY_CASES: tuple[VerifyCase, ...] = _divergence.CASES + _flow.CASES + _quant.CASES + _metrics.CASES

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
    "vector_quantize": "four outputs (z_q with a straight-through gradient, int64 indices, commitment, codebook "
    "term; the registry's tests differentiate one value); indices vs a brute-force argmin, values and gradients vs "
    "the autograd composite, finite differences and vector-quantize-pytorch by tests/test_quant_vq.py",
    "vq_ema_update": "a state update (three outputs, integer indices, no gradient); vs NumPy segment sums, bitwise "
    "across thread counts and vs vector-quantize-pytorch's EMA by tests/test_quant_vq.py",
    "lfq_entropy_loss": "z must be (N, d) with d <= 20 (the registry's shapes are free); vs the brute-force softmax "
    "over all 2^d codes, finite differences, autograd, gradcheck/opcheck/compile and vector-quantize-pytorch's LFQ "
    "by tests/test_quant_vq.py",
    "flow_weight": "the per-sample weighting lambda(t) and its slope (a helper of flow_matching_loss, whose "
    "t-gradient exercises it); checked against its definitions, SD3's cosmap density and diffusers by "
    "tests/test_flow_identities.py",
    **{
        name: "a sampler or its distribution (times from scalars or data, no gradient worth registering); "
        "checked against its density by goodness of fit, quadrature and the papers' formulas by "
        "tests/test_flow_sampling.py"
        for name in ("sample_timesteps", "timestep_density", "timestep_cdf", "timestep_quantile")
    },
    "shift_timesteps": "returns (t', dt'/dt) (two outputs; the registry's tests differentiate one value); "
    "checked against SD3's and Flux's formulas, its inverse and the moved density by tests/test_flow_sampling.py",
    "flux_mu": "a Python float from scalars; checked against diffusers' calculate_shift line by "
    "tests/test_flow_sampling.py",
    "edm_preconditioning": "four outputs (c_skip, c_out, c_in, c_noise; the registry's tests differentiate one "
    "value); value vs Karras et al.'s Table 1 in float64, float32 at sigma 1e-3..1e3, the backward vs finite "
    "differences and torch autograd by tests/test_flow_sampling.py",
    "karras_sigmas": "a discretization from scalars (no array input); checked by tests/test_flow_sampling.py",
    "ict_num_steps": "an int from ints; checked at known steps by tests/test_flow_sampling.py",
    "ict_sigma_probs": "probabilities of a fixed grid (no gradient worth registering); checked against the "
    "erf formula and summing to 1 by tests/test_flow_sampling.py",
    "f_divergence": "reference only (exact D_f of discrete distributions, the oracle of the f-GAN "
    "bounds); checked by tests/test_divergence_identities.py",
    "GaussianMoments": "a streaming state (update/merge/all_reduce), not an elementwise loss; reference and "
    "torch checked against one pass, exact rationals and a 2-process gloo run by tests/test_metrics.py",
    "frechet_distance": "a metric of two feature sets or moments (not a per-sample loss; torch gradient w.r.t. "
    "the features only); checked against closed forms, mpmath, scipy sqrtm and gradcheck by tests/test_metrics.py",
    "prdc": "four Python floats (precision, recall, density, coverage), piecewise constant: no gradient; every "
    "layer vs a brute-force NumPy definition, the prdc package, the tie rule on duplicates and its memory bound "
    "by tests/test_metrics_prdc.py",
    "sliced_wasserstein": "its directions are drawn from the seed in NumPy at call time (shared by every layer), "
    "which torch.compile(fullgraph=True) cannot trace, and seed 0 is valid (the records' int hyperparameters must "
    "refuse 0); value and gradients in every layer vs exact 1-D formulas, scipy, POT, finite differences and "
    "gradcheck by tests/test_metrics_prdc.py",
    "cmmd": "1000 x mmd2 (registered: rbf, bandwidth 10, biased); the factor scales the rounding of kernel means "
    "near 1 past the generic value tolerance (relative to max(1, |value|)); every layer vs the direct and the "
    "official CMMD formulas, the reference backward and finite differences by tests/test_metrics_prdc.py",
    "ot_coupling": "an int64 permutation ('exact') or a (B, B) plan ('sinkhorn'), no gradient; checked "
    "against scipy's linear_sum_assignment, POT's plan and torchcfm by tests/test_metrics_ot.py",
    "gather_with_grad": "a torch.distributed collective (torch only, no reference); its gradient convention is "
    "checked by the 2-process gloo test of tests/test_metrics.py",
    "fsq_indices": "int64 indices from FSQ codes (integer output, no gradient); checked as a bijection and "
    "against vector-quantize-pytorch by tests/test_quant_regularizers.py",
    "fsq_codes": "FSQ codes from int64 indices (integer input, no gradient); checked as the inverse of fsq_indices "
    "by tests/test_quant_regularizers.py",
    "adaptive_gan_weight": "a detached weight from lists of gradients, all-reduced over a process group (no "
    "gradient); checked against taming-transformers and a 2-process gloo run by tests/test_quant_regularizers.py",
    "lazy_regularization": "Python floats from scalars (the lazy gain and Adam's compensated settings); checked "
    "against stylegan2-ada's training_loop lines by tests/test_quant_regularizers.py",
    "lpips_head": "lists of per-layer features and weights (the records take arrays); value and gradients checked "
    "against the official formula and finite differences by tests/test_quant_regularizers.py",
}


for _case in VERIFY_CASES:  # the reasons say where else the op is checked: true by construction
    if _case.name in NOT_REGISTERED:  # (else _check_registry names the case)
        NOT_REGISTERED[_case.name] += (
            f"; every output (and gradient) on every backend vs the reference by its genloss verify case "
            f"(genloss.registry.{_case.family}.CASES)"
        )


def api_markdown() -> str:
    """The API tables of ``notes/API.md``, one per family, generated from the records (a test
    keeps the file in sync: regenerate with ``python -m genloss.registry notes/API.md``)."""
    import inspect

    lines = []
    for family in dict.fromkeys(r.family for r in RECORDS):
        lines += [
            f"### {family}",
            "",
            "| op | signature | reductions | differentiable | derivation |",
            "|---|---|---|---|---|",
        ]
        for r in (r for r in RECORDS if r.family == family):
            sig = str(inspect.signature(raw(r.reference))).replace("|", "\\|")
            red = ", ".join(r.reductions) if r.reductions else ("elementwise" if r.elementwise else "—")
            diff = ", ".join(r.differentiable) or "— (value only)"
            layers = "" if r.has_native else " (reference + torch)"
            lines.append(f"| {r.name}{layers} | `{sig}` | {red} | {diff} | {r.derivation} |")
        lines.append("")
    return "\n".join(lines)


API_BEGIN, API_END = "<!-- api table: generated from genloss.registry -->", "<!-- end of the api table -->"


def write_api(path: str) -> None:
    """Replace the generated part of ``path`` (between API_BEGIN and API_END) with ``api_markdown()``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(API_BEGIN, 1)
    _, tail = rest.split(API_END, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{API_BEGIN}\n{api_markdown()}\n{API_END}{tail}")


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
    names = [c.name for c in VERIFY_CASES]
    for c in VERIFY_CASES:  # a case is for an op without a record (one row per op and backend)
        if c.name in _BY_NAME or c.name not in NOT_REGISTERED or names.count(c.name) != 1:
            raise ValueError(f"verify case {c.name}: must be a NOT_REGISTERED op with one case")
        if any(o.compare not in ("value", "equal") for o in c.outputs):
            raise ValueError(f"verify case {c.name}: an output's compare must be 'value' or 'equal'")
        if bool(c.differentiable) != (c.backward is not None) or bool(c.differentiable) != any(
            o.grad for o in c.outputs
        ):
            raise ValueError(
                f"verify case {c.name}: differentiable, backward and grad outputs must go together"
            )
        if c.differentiable and c.post is not None:
            raise ValueError(f"verify case {c.name}: post maps outputs that carry no gradient only")


_check_registry()
