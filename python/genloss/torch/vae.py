r"""The VAE family and Gaussian mixtures as torch custom ops (``torch.ops.genloss.<name>``).

Signatures follow ``genloss.reference.vae``; the math runs in ``genloss.native.vae``.
Broadcast log-variances are expanded with torch ops before the kernel, so
autograd sums their gradients back to their own shape (a 'none' reduction weights
each sample's share before the sum).  A float16/bfloat16 parameter that is
broadcast is widened to float32 first (the kernel computes in float32 anyway):
its gradient is then summed in float32 and rounded to the input dtype once, not
rounded per element and summed in the low precision (which loses ~1% on a scalar
log-variance, and turns +-inf per-element terms into NaN).
"""

from __future__ import annotations

import torch

from .. import _checks as C
from .. import registry
from ..native import vae as native
from ._op import LossOp, lib, public, schema_of, with_reference_doc

_LOW = (torch.float16, torch.bfloat16)


def _widened(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` as float32 if it is low precision AND will be broadcast (its gradient is a sum)."""
    return t.float() if t.dtype in _LOW and tuple(t.shape) != tuple(shape) else t


def _expand(target: int, target_name: str, index: int, name: str):
    """A ``prepare`` hook: args[index] (a log-variance) broadcast to args[target]'s shape."""

    def prepare(args: list) -> list:
        ref, lv = args[target], args[index]
        if isinstance(lv, torch.Tensor) and isinstance(ref, torch.Tensor):
            try:
                args[index] = _widened(lv, ref.shape).expand(ref.shape)
            except RuntimeError:
                raise ValueError(
                    f"{name} must broadcast to the shape of {target_name} {tuple(ref.shape)}, "
                    f"got shape {tuple(lv.shape)}"
                ) from None
        return args

    return prepare


# gaussian_nll(mean, x, logvar, ...); negative_elbo(recon, x, mu, logvar, beta, likelihood, recon_logvar, ...)
_expand_logvar = _expand(0, "mean", 2, "logvar")
_expand_recon_logvar = _expand(0, "recon", 6, "recon_logvar")


def _broadcast_four(args: list) -> list:
    """normal_kl: the four parameters broadcast together (NumPy rules)."""
    ts = args[:4]
    if all(isinstance(t, torch.Tensor) for t in ts):
        try:
            shape = torch.broadcast_shapes(*(t.shape for t in ts))
            args[:4] = torch.broadcast_tensors(*(_widened(t, shape) for t in ts))
        except RuntimeError:
            got = ", ".join(
                f"{n} {tuple(t.shape)}"
                for n, t in zip(("mean1", "logvar1", "mean2", "logvar2"), ts, strict=True)
            )
            raise ValueError(f"mean1, logvar1, mean2, logvar2 must broadcast together, got {got}") from None
    return args


# name: options; the schema, the differentiable arguments and the docstring come from the record
# and the reference (genloss.registry, genloss.reference.vae).
_OPTIONS: dict[str, dict] = {
    "normal_kl": {"prepare": _broadcast_four, "elementwise": True},
    "gaussian_nll": {"prepare": _expand_logvar},
    "negative_elbo": {"prepare": _expand_recon_logvar},
    "gmm_log_likelihood": {"shared_params": True},
}
OPS: dict[str, LossOp] = {
    r.name: LossOp(r.name, schema_of(r.name), getattr(native, r.name), **_OPTIONS.get(r.name, {}))
    for r in registry.RECORDS
    if r.family == "vae" and r.has_native and r.differentiable
}

gaussian_kl = public(OPS["gaussian_kl"], __name__)
normal_kl = public(OPS["normal_kl"], __name__)
bernoulli_nll = public(OPS["bernoulli_nll"], __name__)
gaussian_nll = public(OPS["gaussian_nll"], __name__)
negative_elbo = public(OPS["negative_elbo"], __name__)
iwae_bound = public(OPS["iwae_bound"], __name__)
gmm_log_likelihood = public(OPS["gmm_log_likelihood"], __name__)


# ---------------------------------------------------------------- (VAE.12)
lib.define("gmm_responsibilities(Tensor x, Tensor logits, Tensor means, Tensor logvars) -> Tensor")


def _responsibilities_kernel(x, logits, means, logvars):
    low = x.dtype in (torch.float16, torch.bfloat16)
    args = [t.float() if low else t for t in (x, logits, means, logvars)]
    r = native.gmm_responsibilities(*args)
    return r


@torch.library.register_fake("genloss::gmm_responsibilities", lib=lib)
def _responsibilities_fake(x, logits, means, logvars):
    dt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return x.new_empty((x.shape[0], logits.shape[0]), dtype=dt)


lib.impl("gmm_responsibilities", _responsibilities_kernel, "CPU")
lib.impl("gmm_responsibilities", _responsibilities_kernel, "CUDA")
# No autograd formula: the wrapper refuses inputs that require grad at forward time (SPEC), so a
# gradient is never silently missing; a direct torch.ops call that tracks grad still raises in backward.
torch.library.register_autograd(
    "genloss::gmm_responsibilities",
    lambda ctx, grad: (_ for _ in ()).throw(
        RuntimeError("genloss.gmm_responsibilities is not differentiable (it is the E-step posterior)")
    ),
    lib=lib,
)


@with_reference_doc
def gmm_responsibilities(x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor):
    r"""(N, K) posterior over components, :math:`r_{nk} = \operatorname{softmax}_k(\log\pi_k + \log\mathcal N(x_n))`.

    The E-step; not differentiable (use ``gmm_log_likelihood`` to train): with grad enabled, an
    input that requires grad is refused at forward time (call it under ``torch.no_grad()`` or pass
    detached tensors). (VAE.12)
    """
    for name, t in (("x", x), ("logits", logits), ("means", means), ("logvars", logvars)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gmm_responsibilities: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(
                f"gmm_responsibilities: {name} must be on the device of x ({x.device}), got {t.device}"
            )
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"gmm_responsibilities: {name} requires grad, but the responsibilities are not "
                f"differentiable (the E-step posterior); call it under torch.no_grad() or pass "
                f"{name}.detach(), and train with gmm_log_likelihood"
            )
    C.ndim("x", tuple(x.shape), 2)
    return torch.ops.genloss.gmm_responsibilities(x, logits, means, logvars)


# Literal names (the ops of OPS, then the helpers), so type checkers see what genloss.torch re-exports;
# tests/test_torch_ops.py reaches every record's op through genloss.torch.
__all__ = [
    "gaussian_kl",
    "normal_kl",
    "bernoulli_nll",
    "gaussian_nll",
    "negative_elbo",
    "iwae_bound",
    "gmm_log_likelihood",
    "gmm_responsibilities",
]
