"""The records of the vae family."""

from __future__ import annotations

import dataclasses

from ..reference import vae as _vae
from .core import ALL, DEFAULT, TWO, Arg, Hyper, OpRecord, Variant, _v, record_factory  # noqa: F401

_vrec = record_factory("vae", _vae, "VAE")


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
          ("mu", "logvar"), ALL, 4),
    _vrec("normal_kl", [Arg("mean1", "mean", ("B", "..."), broadcast=True), _lv("logvar1", ("B", "...")),
                        Arg("mean2", "mean", ("B", "..."), broadcast=True), _lv("logvar2", ("B", "..."))],
          ("mean1", "logvar1", "mean2", "logvar2"), (), 5, elementwise=True,
          # NumPy broadcasting: (B, 1), (F,), (B, F) and 0-d give a (B, F) value
          variants=(DEFAULT, _v(args=(Arg("mean1", "mean", ("B", "1"), broadcast=True), _lv("logvar1", ("F",)),
                                      Arg("mean2", "mean", ("B", "F"), broadcast=True), _lv("logvar2", ()))))),
    _vrec("bernoulli_nll", [Arg("logits", "logits", ("B", "...")), Arg("x", "probabilities", ("B", "..."))],
          ("logits", "x"), ALL, 6),
    _vrec("gaussian_nll", [Arg("mean", "mean", ("B", "...")), Arg("x", "data", ("B", "...")),
                           _lv("logvar", ("B", "..."))],
          ("mean", "x", "logvar"), ALL, 7,
          # per element, one learned scalar, per feature (the last: the non-contiguous tests use it)
          variants=(DEFAULT, _v(args=(_lv("logvar", ()),)), _v(args=(_lv("logvar", ("...",)),)))),
    _vrec("negative_elbo", [Arg("recon", "logits", ("B", "...")), Arg("x", "probabilities", ("B", "...")),
                            Arg("mu", "mean", ("B", "...2")), Arg("logvar", "logvar", ("B", "...2")), _RECON_LOGVAR],
          ("recon", "mu", "logvar", "recon_logvar"), ALL, 8,
          hypers=(Hyper("beta", "real", low=0.0), Hyper("likelihood", "choice", ("bernoulli", "gaussian"))),
          # recon_logvar None (unit variance), per element, per feature; beta 0 (no rate term) to 4
          variants=(DEFAULT, _v(beta=0.25, likelihood="bernoulli"), _v(beta=4.0, likelihood="gaussian"),
                    _v(beta=2.5, likelihood="gaussian",
                       args=(dataclasses.replace(_RECON_LOGVAR, shape=("B", "...")),)),
                    _v(beta=0.0, likelihood="gaussian", args=(_RECON_LOGVAR,))),
          rejects=((_v(likelihood="bernoulli", args=(_RECON_LOGVAR,)), "recon_logvar"),)),
    _vrec("iwae_bound", [Arg("log_weights", "log_weights", ("B", "K"))], ("log_weights",), ALL, 10),
    _vrec("gmm_log_likelihood", _GMM_ARGS, ("x", "logits", "means", "logvars"), ALL, 11, caps=_GMM_CAPS,
          bounded_sums=(("logits", "B"),)),  # sum_n w_n (r_nk - pi_k), |r - pi| <= 1
    _vrec("gmm_responsibilities", _GMM_ARGS, (), (), 12, caps=_GMM_CAPS),
)  # fmt: skip

RECORDS = VAE_RECORDS
