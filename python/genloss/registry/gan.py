"""The records of the gan family."""

from __future__ import annotations

import dataclasses  # noqa: F401

from ..reference import gan as _gan
from .core import ALL, DEFAULT, TWO, Arg, Hyper, OpRecord, Variant, _v, record_factory  # noqa: F401

_MODES = ("nonsaturating", "minimax")
_DIVS = tuple(_gan.F_DIVERGENCES)
# exp-based f-divergences: e^{+-v} overflows at |v| = 1e4 (the exact value is out of range).
_FGAN_OVERFLOWS = ("kl", "reverse_kl", "squared_hellinger")


_rec = record_factory("gan", _gan, "GAN")


def _two(domain: str, real: str, fake: str, kinks=((), ())) -> tuple[Arg, Arg]:
    return Arg(real, domain, ("Br", "..."), kinks[0]), Arg(fake, domain, ("Bf", "..."), kinks[1])


RECORDS: tuple[OpRecord, ...] = (
    _rec("gan_d_loss", _two("logits", "real_logits", "fake_logits"), ("real_logits", "fake_logits"), TWO, 3,
         loose=("...",)),
    _rec("gan_g_loss", [Arg("fake_logits", "logits", ("B", "..."))], ("fake_logits",), ALL, 7,
         hypers=(Hyper("mode", "choice", _MODES),), variants=tuple(_v(mode=m) for m in _MODES)),
    _rec("lsgan_d_loss", _two("outputs", "real_out", "fake_out"), ("real_out", "fake_out"), TWO, 8,
         hypers=(Hyper("a", "real"), Hyper("b", "real")), variants=(DEFAULT, _v(a=-1.0, b=0.5)), loose=("...",)),
    _rec("lsgan_g_loss", [Arg("fake_out", "outputs", ("B", "..."))], ("fake_out",), ALL, 8,
         hypers=(Hyper("c", "real"),), variants=(DEFAULT, _v(c=0.25))),
    _rec("wgan_critic_loss", _two("scores", "real_scores", "fake_scores"), ("real_scores", "fake_scores"), TWO, 9,
         loose=("...",)),
    _rec("wgan_g_loss", [Arg("fake_scores", "scores", ("B", "..."))], ("fake_scores",), ALL, 9),
    _rec("hinge_d_loss", _two("scores", "real_scores", "fake_scores", kinks=((1.0,), (-1.0,))),
         ("real_scores", "fake_scores"), TWO, 10, loose=("...",)),
    _rec("hinge_g_loss", [Arg("fake_scores", "scores", ("B", "..."))], ("fake_scores",), ALL, 10),
    *(
        _rec(name, _two("logits", "real_logits", "fake_logits"), ("real_logits", "fake_logits"), TWO, 11,
             hypers=(Hyper("average", "flag"),), loose=("...",),
             # RSGAN pairs real and fake element by element: same batch and trailing dims.
             variants=(_v(average=True), _v(average=False, same=(("Bf", "Br"),), loose=())))
        for name in ("relativistic_d_loss", "relativistic_g_loss")
    ),
    _rec("gradient_penalty_from_grads", [Arg("grads", "grads", ("B", "..."))], ("grads",), ALL, 12,
         hypers=(Hyper("lambda_", "real"), Hyper("center", "real"), Hyper("one_sided", "flag")),
         variants=(DEFAULT, _v(one_sided=True), _v(lambda_=2.5, center=0.0), _v(lambda_=0.5, center=2.0, one_sided=True)),
         norm_kink="grads"),
    _rec("r1_penalty_from_grads", [Arg("grads", "grads", ("B", "..."))], ("grads",), ALL, 13,
         hypers=(Hyper("gamma", "real"),), variants=(DEFAULT, _v(gamma=0.3))),
    _rec("feature_matching_loss", [Arg("real_features", "features", ("Br", "F")),
                                   Arg("fake_features", "features", ("Bf", "F"))],
         ("real_features", "fake_features"), (), 14),
    _rec("ssgan_critic_loss", [Arg("labeled_logits", "class_logits", ("Bl", "K")), Arg("labels", "labels", ("Bl",)),
                               Arg("unlabeled_logits", "class_logits", ("Bu", "K")),
                               Arg("fake_logits", "class_logits", ("Bf", "K"))],
         ("labeled_logits", "unlabeled_logits", "fake_logits"), TWO, 15),
    _rec("ssgan_g_loss", [Arg("fake_logits", "class_logits", ("B", "K"))], ("fake_logits",), ALL, 15),
    _rec("l1_loss", [Arg("input", "images", ("B", "...")), Arg("target", "images", ("B", "..."))],
         ("input", "target"), ALL, 16, kink_pairs=(("input", "target"),)),
    _rec("pix2pix_g_loss", [Arg("fake_logits", "logits", ("B", "...")), Arg("generated", "images", ("B", "...2")),
                            Arg("target", "images", ("B", "...2"))],
         ("fake_logits", "generated", "target"), ALL, 16, hypers=(Hyper("lambda_l1", "real"),),
         variants=(DEFAULT, _v(lambda_l1=3.0)), kink_pairs=(("generated", "target"),)),
    _rec("cycle_consistency_loss", [Arg("real_a", "images", ("Ba", "...")), Arg("rec_a", "images", ("Ba", "...")),
                                    Arg("real_b", "images", ("Bb", "...2")), Arg("rec_b", "images", ("Bb", "...2"))],
         ("real_a", "rec_a", "real_b", "rec_b"), TWO, 16, hypers=(Hyper("lambda_cyc", "real"),),
         variants=(DEFAULT, _v(lambda_cyc=0.5)), kink_pairs=(("rec_a", "real_a"), ("rec_b", "real_b"))),
    _rec("spectral_norm_sigma", [Arg("W", "weight", ("O", "I")), Arg("u", "vector", ("O",))], ("W",), (), 17,
         hypers=(Hyper("n_iters", "int"), Hyper("eps", "real")),
         # The backward holds u, v constant (as torch.nn.utils.spectral_norm): it is the
         # derivative of sigma only once the power iteration has converged (n_iters=30 on
         # a W with spectral gap >= 2), not after one step.
         variants=(_v(n_iters=1, fd=False), _v(n_iters=30)),
         extreme_finite=False, has_native=False, value_index=0),
    _rec("fgan_d_loss", _two("scores", "real_v", "fake_v"), ("real_v", "fake_v"), TWO, 18,
         hypers=(Hyper("divergence", "choice", _DIVS),), loose=("...",),
         variants=tuple(_v(divergence=d, extreme_finite=d not in _FGAN_OVERFLOWS) for d in _DIVS)),
    _rec("fgan_g_loss", [Arg("fake_v", "scores", ("B", "..."))], ("fake_v",), ALL, 18,
         hypers=(Hyper("divergence", "choice", _DIVS), Hyper("mode", "choice", _MODES)),
         variants=tuple(_v(divergence=d, mode=m, extreme_finite=d not in _FGAN_OVERFLOWS)
                        for d in _DIVS for m in _MODES)),
    _rec("jsd_estimate", _two("logits", "real_logits", "fake_logits"), ("real_logits", "fake_logits"), (), 6,
         loose=("...",)),
)  # fmt: skip
