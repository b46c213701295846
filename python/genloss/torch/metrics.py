r"""Evaluation metrics in torch: streaming Gaussian moments that merge across the ranks of a
``torch.distributed`` job, the Fréchet distance differentiable w.r.t. the features, and an
all-gather that keeps the gradient of the local shard.

The math is the reference's (``genloss.reference.metrics``, ``derivations/metrics.md``);
here it runs in float64 on the data's device.  No native kernels: the work is a few
matrix products and one small SVD, which the BLAS / cuSOLVER of torch already do.
"""

from __future__ import annotations

from typing import Any

import torch

from ..reference.metrics import chan_merge, dtype_eps, feature_scale, psd_bands
from ._op import device_arg, eager_checks, has_storage, once_differentiable_grads

__all__ = ["GaussianMoments", "frechet_distance", "gather_with_grad"]


def _features(op: str, name: str, x: object, dim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{op}: {name} must be a real numeric tensor, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{op}: {name} must have shape (n, d) with d >= 1, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{op}: {name} must have {dim} features, got shape {tuple(x.shape)}")
    return x


def _distributed(op: str, group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{op}: torch.distributed is not initialized (call init_process_group first)")
    return dist, dist.get_world_size(group), dist.get_rank(group)


# ============================================================================= GaussianMoments


class GaussianMoments:
    r"""Streaming mean and unbiased (n − 1) covariance of features in float64, on the device
    of the first batch; ``update`` / ``merge`` by Chan's pairwise update (MET.1), and
    ``all_reduce`` to merge the states of every rank of a ``torch.distributed`` job.

    The same class as ``genloss.reference.metrics.GaussianMoments`` on tensors; no gradient
    flows through it (batches are detached: for a gradient use :func:`frechet_distance` on
    the features).

    The state is ``n``, ``mean`` and the centred scatter ``m2`` (d x d), which ``update`` and
    ``merge`` change IN PLACE (no second d x d array while streaming); ``mean`` and ``cov``
    are new tensors after each update.

    Parameters
    ----------
    dim : int, optional
        ``d``; needed on a rank that may see no data before ``all_reduce``.
    device : torch.device or str, optional
        Where the state lives before the first batch (default: that batch's device).
    """

    _op = "GaussianMoments"

    def __init__(self, dim: int | None = None, device=None):
        if dim is not None:
            if isinstance(dim, bool) or not isinstance(dim, int):
                raise TypeError(f"{self._op}: dim must be an int, got {type(dim).__name__}")
            if dim < 1:
                raise ValueError(f"{self._op}: dim must be >= 1, got {dim}")
        self.dim = dim
        self.n = 0
        self.device = device_arg(self._op, device)
        self._mean: Any = None  # float64 tensors once the first batch arrives
        self.m2: Any = None

    def update(self, x: torch.Tensor) -> GaussianMoments:
        """Fold the batch ``x`` (n, d) into the state (float64, detached); returns ``self``."""
        x = _features(f"{self._op}.update", "x", x, self.dim)
        if self.dim is None:
            self.dim = x.shape[1]
        if self.device is None:
            self.device = x.device
        if x.shape[0] == 0:
            return self
        refuse_capture(x, f"{self._op}.update", "the sample count is a Python int that a replay would not "
                       "advance, and the finiteness check reads a value back")  # fmt: skip
        a = x.detach().to(device=self.device, dtype=torch.float64)
        if not bool(torch.isfinite(a).all()):
            raise ValueError(
                f"{self._op}.update: x must be finite (a NaN or inf would poison every later merge)"
            )
        mean_b = a.mean(dim=0)
        c = a - mean_b  # two passes within the batch
        del a
        if self.n == 0:
            self.n, self._mean, self.m2 = c.shape[0], mean_b, c.T @ c
            return self
        # Chan's merge with the batch (MET.1), its scatter c^T c added straight into the state:
        # the state's M2 is the only d x d array an update holds (a 50,000 x 2,048 stream
        # peaks at its two states and one batch: bench/bench_frechet.py)
        n_a, n_b = self.n, c.shape[0]
        n = n_a + n_b
        delta = mean_b - self._mean
        self.m2.addmm_(c.T, c).addr_(delta, delta, alpha=n_a * n_b / n)
        self.n, self._mean = n, self._mean + delta * (n_b / n)
        return self

    def merge(self, other: GaussianMoments) -> GaussianMoments:
        """Fold another state (same ``d``) into this one; returns ``self``."""
        if not isinstance(other, GaussianMoments):
            raise TypeError(f"{self._op}.merge: other must be a GaussianMoments, got {type(other).__name__}")
        if None not in (self.dim, other.dim) and other.dim != self.dim:  # an empty state's d counts too
            raise ValueError(f"{self._op}.merge: other has d={other.dim}, this state d={self.dim}")
        if other.n == 0:
            return self
        self.dim = other.dim
        if self.device is None:
            self.device = other.device
        self._merge(other.n, other._mean.to(self.device), other.m2.to(self.device))
        return self

    def _merge(self, n_b, mean_b, m2_b):
        if self.n == 0:
            self.n, self._mean, self.m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        n_a = self.n
        n = n_a + n_b
        delta = mean_b - self._mean  # (MET.1), M2 updated in place as in update()
        self.m2.add_(m2_b).addr_(delta, delta, alpha=n_a * n_b / n)
        self.n, self._mean = n, self._mean + delta * (n_b / n)

    def all_reduce(self, group=None) -> GaussianMoments:
        r"""Replace this rank's state by the merge of every rank's state (in place; returns ``self``).

        One ``all_gather`` of every rank's d (a rank without data and dim, or ranks of different d,
        raise a ValueError on every rank), one of the packed ``(n, mean, M2)`` (``1 + d + d^2``
        float64 values per rank), then every rank merges the W states itself in the same fixed order, a
        pairwise tree over rank numbers (MET.1): the result is bitwise the same on every rank
        and equals one process merging the same parts.  Call it once per evaluation (a
        second call would count every sample W times).  A rank without data contributes
        ``n = 0``; it needs ``dim`` (the constructor's) to size its message.
        """
        op = f"{self._op}.all_reduce"
        dist, world, _ = _distributed(op, group)
        device = self.device if self.device is not None else torch.device("cpu")
        # Every rank's d first (-1: no data, no dim): a rank that cannot take part, or ranks whose
        # messages would differ in size, are a ValueError on EVERY rank (one rank raising alone
        # left its peers blocked in all_gather, and unequal sizes aborted the gloo process).
        dims = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        mine = torch.tensor([-1 if self.dim is None else self.dim], dtype=torch.int64, device=device)
        dist.all_gather(dims, mine, group=group)
        ds = [int(t.item()) for t in dims]
        if -1 in ds:
            ranks = [r for r, v in enumerate(ds) if v == -1]
            raise ValueError(f"{op}: rank(s) {ranks} of the group have no data and no dim; construct with "
                             f"GaussianMoments(dim=d)")  # fmt: skip
        if len(set(ds)) > 1:
            raise ValueError(
                f"{op}: the ranks' dims differ ({ds}, in rank order); every rank needs the same d"
            )
        d = ds[0]
        packed = torch.zeros(1 + d + d * d, dtype=torch.float64, device=device)
        if self.n:
            packed[0] = self.n
            packed[1 : 1 + d] = self._mean
            packed[1 + d :] = self.m2.reshape(-1)
        parts = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(parts, packed, group=group)
        states = [(int(p[0].item()), p[1 : 1 + d], p[1 + d :].reshape(d, d)) for p in parts]
        while len(states) > 1:  # fixed pairwise tree: (0,1), (2,3), ... then again
            states = [
                chan_merge(*states[i], *states[i + 1]) if i + 1 < len(states) else states[i]
                for i in range(0, len(states), 2)
            ]
        self.n, self._mean, self.m2 = states[0]
        self.device = device
        return self

    @property
    def mean(self) -> torch.Tensor:
        if self.n < 1:
            raise ValueError(f"{self._op}.mean: no samples yet")
        return self._mean.clone()  # a copy: the caller's in-place edit must not change the state

    @property
    def cov(self) -> torch.Tensor:
        if self.n < 2:
            raise ValueError(f"{self._op}.cov: the unbiased covariance needs n >= 2 samples, have {self.n}")
        c = self.m2 + self.m2.T  # symmetric to the last bit, one d x d array
        return c.mul_(0.5 / (self.n - 1))

    def __repr__(self) -> str:
        return f"GaussianMoments(n={self.n}, dim={self.dim}, device={self.device})"


# ============================================================================= Fréchet distance


class _TraceSqrt(torch.autograd.Function):
    r""":math:`t(A, B) = \lVert A B^\top\rVert_*` for centred features A (n1, d), B (n2, d),
    with the minimum-norm subgradient (MET.5).

    Forward: ``A = Q_A R_A`` (reduced QR; ``R_A = A`` itself, ``Q_A = I``, when n1 <= d), the
    same for B, and the SVD :math:`R_A R_B^\top = U S V^\top` of a matrix of at most d x d:
    :math:`AB^\top = Q_A U S V^\top Q_B^\top`, so :math:`t = \sum S`.  Backward: the gradient of
    the nuclear norm of :math:`M = AB^\top` is its polar factor :math:`U_r V_r^\top` over the
    singular values above :math:`\max(n_1,n_2,d)\,\varepsilon\,S_{\max}` (unique, hence finite,
    at repeated non-zero singular values; at vanishing ones the minimum-norm element of the
    subdifferential, i.e. the null directions get 0), and
    :math:`\partial t/\partial A = Q_A U_r V_r^\top R_B`, :math:`\partial t/\partial B = Q_B V_r U_r^\top R_A`.
    No inverse of R appears, so rank-deficient data are fine.  Once differentiable: a second
    derivative raises (``once_differentiable_grads``), never a silent 0.
    """

    @staticmethod
    def forward(ctx, a, b):
        parts = _trace_sqrt_parts(a, b)
        ctx.save_for_backward(a, b, *parts)
        return parts[-2].sum()  # (MET.3)

    @staticmethod
    def backward(ctx, g):
        a, b, *parts = ctx.saved_tensors
        return _trace_sqrt_grads(ctx, g, a, b, parts)


class _TraceSqrtTransforms(torch.autograd.Function):
    """``_TraceSqrt`` in the form torch.func transforms take (grad, vmap: ``apply`` picks it for
    their wrapped tensors): only inputs and outputs may be saved there, so backward factors again."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b):
        ra, rb = _qr(a)[1], _qr(b)[1]
        return torch.linalg.svdvals(ra @ rb.T).sum()  # (MET.3)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return _trace_sqrt_grads(ctx, g, a, b, _trace_sqrt_parts(a, b))

    @staticmethod
    def jvp(ctx, t_a, t_b):  # forward mode: <dt/dA, t_A> + <dt/dB, t_B> with MET.5's gradients
        a, b = ctx.saved_tensors
        slopes = _trace_sqrt_slopes(a, b, _trace_sqrt_parts(a, b), (t_a is not None, t_b is not None))
        terms = [(t * g).sum() for t, g in zip((t_a, t_b), slopes, strict=True) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None


def _trace_sqrt_parts(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """(Q_A, R_A, Q_B, R_B, U, S, V^T) of MET.5 (a Q is None where R is the matrix itself)."""
    qa, ra = _qr(a)
    qb, rb = _qr(b)
    u, s, vh = torch.linalg.svd(ra @ rb.T, full_matrices=False)
    return qa, ra, qb, rb, u, s, vh


def _trace_sqrt_slopes(a, b, parts, want: tuple) -> tuple:
    """MET.5: dt/dA = Q_A U_r V_r^T R_B and dt/dB = Q_B V_r U_r^T R_A (None where ``want`` says not)."""
    qa, ra, qb, rb, u, s, vh = parts
    size = max(a.shape[0], b.shape[0], a.shape[1])
    keep = (s > size * torch.finfo(s.dtype).eps * s.max()).to(s.dtype)
    polar = (u * keep) @ vh  # U_r V_r^T in the reduced coordinates  (MET.5)
    out = []
    for w, g, q in zip(want, (polar @ rb, polar.T @ ra), (qa, qb), strict=True):
        out.append(None if not w else g if q is None else q @ g)
    return tuple(out)


def _trace_sqrt_grads(ctx, g, a, b, parts) -> tuple:
    """MET.5's slopes times the incoming gradient, once differentiable."""
    with torch.no_grad():
        slopes = _trace_sqrt_slopes(a, b, parts, tuple(ctx.needs_input_grad[:2]))
        grads = tuple(None if d is None else g * d for d in slopes)
    return once_differentiable_grads("frechet_distance", grads, (a, b))


def _qr(a: torch.Tensor):
    """(Q, R) with a = Q R and R of at most d rows; (None, a) when a has no more rows than columns."""
    if a.shape[0] <= a.shape[1]:
        return None, a
    return torch.linalg.qr(a, mode="reduced")


def _finite(t: torch.Tensor) -> bool:
    """All finite, where a data check may read the device (eager_checks); else assumed."""
    return not eager_checks(t) or bool(torch.isfinite(t).all())


def _sqrt_factor(op: str, name: str, cov: torch.Tensor, eps_in: float) -> torch.Tensor:
    """V_r Lambda_r^(1/2), eigenvalues at or below d eps_in lambda_max dropped, below
    -max(1e-8, 4 d eps_in) lambda_max refused: the reference's ``psd_bands``, eps_in the machine
    epsilon of the dtype cov was given in (MET.4)."""
    # value only (the moments form refuses grad), so in place where it saves a d x d array:
    # at d = 2,048 each is 32 MiB (bench/bench_frechet.py)
    sym = cov + cov.T
    lam, v = torch.linalg.eigh(sym.mul_(0.5))
    del sym
    top = float(lam[-1].clamp(min=0))
    refuse, drop = psd_bands(cov.shape[0], eps_in)
    if float(lam[0]) < -refuse * max(top, torch.finfo(torch.float64).tiny):
        raise ValueError(
            f"{op}: {name} is not positive semi-definite (eigenvalue {float(lam[0]):.3g}, largest {top:.3g})"
        )
    keep = lam > drop * top
    if not bool(keep.all()):
        v, lam = v[:, keep], lam[keep]
    return v.mul_(lam.sqrt())


def frechet_distance(*args) -> torch.Tensor:
    r"""Fréchet distance :math:`\lVert\mu_1-\mu_2\rVert^2+\operatorname{tr}\Sigma_1+\operatorname{tr}\Sigma_2
    -2\operatorname{tr}\sqrt{\Sigma_1\Sigma_2}` in float64, a 0-d tensor on the inputs' device.  (MET.2-MET.5)

    Call forms as ``genloss.reference.frechet_distance``: features ``(x, y)`` of shape
    (n1, d), (n2, d) — differentiable w.r.t. both (MET.5: the nuclear norm of the centred
    :math:`AB^\top/\sqrt{(n_1-1)(n_2-1)}` through QR and one SVD of at most d x d, with the
    minimum-norm subgradient where singular values vanish; once differentiable); two
    :class:`GaussianMoments`; or ``(mu1, cov1, mu2, cov2)`` (value only: refused when one
    requires grad, since the eigendecomposition's gradient is infinite at repeated
    eigenvalues).  Features of float32 are promoted to float64 (the gradient is returned
    in their dtype by autograd).
    """
    op = "frechet_distance"
    if len(args) == 2 and all(isinstance(a, GaussianMoments) for a in args):
        args = (args[0].mean, args[0].cov, args[1].mean, args[1].cov)
    for t in args:
        if isinstance(t, torch.Tensor):
            refuse_capture(t, op, "torch.linalg's eigen- and singular-value decompositions read their status back "
                           "to the host on CUDA")  # fmt: skip
    if len(args) == 4:
        names = ("mu1", "cov1", "mu2", "cov2")
        for name, t in zip(names, args, strict=True):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_complex() or t.dtype == torch.bool:  # as the reference: .to(float64) would drop
                raise TypeError(f"{op}: {name} must be a real tensor, got {t.dtype}")  # the imaginary part
            if t.requires_grad:
                raise ValueError(
                    f"{op}: {name} requires grad; the moments form is value-only (differentiate the features form)"
                )
        # the PSD tolerances follow the dtype the covariances came in (MET.4): a float32 covariance
        # of n < d samples has zero eigenvalues of float32 rounding size, of either sign
        eps1, eps2 = dtype_eps(args[1]), dtype_eps(args[3])
        mu1, cov1, mu2, cov2 = (t.to(torch.float64) for t in args)
        for k, (mu, cov) in enumerate(((mu1, cov1), (mu2, cov2)), 1):
            if mu.dim() != 1 or mu.shape[0] == 0 or tuple(cov.shape) != (mu.shape[0], mu.shape[0]):
                raise ValueError(
                    f"{op}: mu{k} must have shape (d,) and cov{k} (d, d), d >= 1, got {tuple(mu.shape)}, {tuple(cov.shape)}"
                )
            if not (_finite(mu) and _finite(cov)):  # as the reference (LAPACK would fail on them)
                raise ValueError(f"{op}: mu{k} and cov{k} must be finite")
        if mu1.shape != mu2.shape:
            raise ValueError(
                f"{op}: mu2 must have the dimension of mu1 (d={mu1.shape[0]}), got {tuple(mu2.shape)}"
            )
        diff = mu1 - mu2
        rest = diff @ diff + torch.diagonal(cov1).sum() + torch.diagonal(cov2).sum()
        # the GaussianMoments form's covariances are ours: no reference left but cov1 / cov2,
        # each freed once it is factored
        del args, t, mu, cov
        f1 = _sqrt_factor(op, "cov1", cov1, eps1)
        del cov1
        f2 = _sqrt_factor(op, "cov2", cov2, eps2)
        del cov2
        tsqrt = torch.linalg.svdvals(f1.T @ f2).sum() if f1.shape[1] and f2.shape[1] else mu1.new_zeros(())
        return rest - 2.0 * tsqrt  # (MET.2)
    if len(args) != 2:
        raise TypeError(
            f"{op}: takes (x, y) features, two GaussianMoments, or (mu1, cov1, mu2, cov2); got {len(args)} arguments"
        )
    x = _features(op, "x", args[0])
    y = _features(op, "y", args[1], x.shape[1])
    for name, t in (("x", x), ("y", y)):
        if t.shape[0] < 2:
            raise ValueError(
                f"{op}: {name} needs at least 2 samples (the unbiased covariance), got {t.shape[0]}"
            )
        if not _finite(t):  # as the reference: the SVD would fail with LAPACK's error
            raise ValueError(f"{op}: {name} must be finite")
    x, y = x.to(torch.float64), y.to(torch.float64)
    # features beyond 2^+-450 are divided by a power of two s and the value multiplied by s^2 (exact;
    # autograd carries the factor): at 1e200 the scatter overflowed and the SVD raised LAPACK's error
    plain = has_storage(x) and has_storage(y)  # not a torch.func transform's wrapper (no read-back there)
    s = (
        feature_scale(float(torch.maximum(x.detach().abs().amax(), y.detach().abs().amax())))
        if plain
        else 1.0
    )
    if s != 1.0:
        x, y = x / s, y / s
    n1, n2 = x.shape[0], y.shape[0]
    mu1, mu2 = x.mean(dim=0), y.mean(dim=0)
    a, b = x - mu1, y - mu2
    diff = mu1 - mu2
    trace_sqrt = _TraceSqrt if plain else _TraceSqrtTransforms
    tsqrt = trace_sqrt.apply(a, b) / ((n1 - 1) * (n2 - 1)) ** 0.5  # (MET.4)
    value = diff @ diff + (a * a).sum() / (n1 - 1) + (b * b).sum() / (n2 - 1) - 2.0 * tsqrt  # (MET.2)
    return value if s == 1.0 else value * s * s  # (feature_scale: the gradient needs s^2 finite)


# ============================================================================= gather_with_grad


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        dist, world, rank = _distributed("gather_with_grad", group)
        sizes = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        all_sizes = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes, group=group)
        counts = [int(s.item()) for s in all_sizes]
        top = max(counts)
        padded = x.new_zeros((top, *x.shape[1:]))  # all_gather needs equal shapes
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        parts[rank] = x  # the local shard as it is (the same values)
        ctx.group, ctx.counts, ctx.rank = group, counts, rank
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)  # (MET.6) sum over the ranks' losses
        start = sum(ctx.counts[: ctx.rank])
        return g[start : start + ctx.counts[ctx.rank]], None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    r"""All-gather ``x`` (shape (n_r, ...), n_r may differ per rank) along dim 0 over the ranks of
    ``group``, in rank order, keeping the gradient of the local shard.  (MET.6)

    Gradient convention: the backward SUMS the incoming gradient over the ranks (one
    ``all_reduce``) and returns the local shard's slice, so rank r's shard receives
    :math:`\sum_s \partial L_s/\partial x_r`, the gradient of the sum of the ranks' losses.
    When every rank computes the SAME global loss L on the gathered batch (the use here:
    ``mmd2`` or ``frechet_distance`` over the global batch), that is
    :math:`W\,\partial L/\partial x_r`; DistributedDataParallel then AVERAGES the parameter
    gradients over the W ranks, and the update is exactly :math:`\partial L/\partial\theta` of one
    process computing L on the concatenated batch (as ``torch.distributed.nn.all_gather``).
    Without DDP's averaging (a hand-written all_reduce SUM of parameter gradients) divide
    the loss by W.  Every rank must call it (a collective); ``x`` is communicated in its own
    dtype (gloo: CPU tensors; nccl: CUDA).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"gather_with_grad: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("gather_with_grad: x must have a batch dim (dim >= 1), got a 0-d tensor")
    return _GatherWithGrad.apply(x, group)


# ============================================================================= optimal transport
# sinkhorn_divergence (MET.20-MET.24) and ot_coupling (MET.25-MET.27): the native kernels on the
# tensors' device (cpp/src/ot_cpu.cpp, cuda/ot.cu), float64.

from ..native import metrics as _native_ot  # noqa: E402
from ..reference import metrics as _ref_ot  # noqa: E402
from ._op import LossOp, public, refuse_capture, schema_of  # noqa: E402


def _points(op: str, name: str, t: object, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{op}: {name} must have shape (n, D) with n, D >= 1, got shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(
            f"{op}: {name} must have D={dim} features (those of the first input), got {tuple(t.shape)}"
        )
    return t


def _sinkhorn_kernel(x, y, eps, p=2.0, scaling=0.5, tol=1e-8, max_iter=1000, *, need_grad=True):
    """The op's kernel, ``(value, grads)``: the native kernel on the tensors' device (CPU or CUDA)."""
    if isinstance(x, torch.Tensor):
        refuse_capture(x, "sinkhorn_divergence", "the iterations stop when the potentials converge (a test read "
                       "on the host)")  # fmt: skip
    return _native_ot.sinkhorn_divergence(x, y, eps, p, scaling, tol, max_iter, need_grad=need_grad)


sinkhorn_divergence = public(
    LossOp("sinkhorn_divergence", schema_of("sinkhorn_divergence"), _sinkhorn_kernel), __name__
)


def ot_coupling(x0: torch.Tensor, x1: torch.Tensor, method: str = "exact", eps: float = 0.1,
                tol: float = 1e-8, max_iter: int = 1000) -> torch.Tensor:  # fmt: skip
    r"""Minibatch OT pairing of x0 (B, D) and x1 (B, D) on their device.  (MET.25-MET.27)

    ``'exact'``: a LongTensor permutation ``perm`` on x0's device, ``x1[perm[i]]`` pairs with
    ``x0[i]``, minimizing :math:`\sum_i\lVert x_{0,i}-x_{1,\mathrm{perm}(i)}\rVert^2` (the native
    Hungarian solver, float64, ties to the lowest column; on CUDA its one-block port, the same
    permutation bit for bit, with no host round trip: it captures in a CUDA graph, the check that
    the inputs are finite being skipped under capture as every data check is).
    ``'sinkhorn'``: the (B, B) float64 entropic plan of ``genloss.reference.ot_coupling``, computed
    where the data lives (the native Sinkhorn kernel on CPU or CUDA; it reads its convergence test
    back, so it refuses capture); sample pairs from it like torchcfm
    (``torch.multinomial(plan.flatten(), B)``).  No gradient.
    """
    op = "ot_coupling"
    e = _ref_ot.check_coupling_args(op, method, eps)  # None for 'exact', which ignores eps
    _ref_ot.check_sinkhorn_args(op, 1.0, 2.0, 0.5, tol, max_iter)  # tol and max_iter
    _points(op, "x0", x0)
    _points(op, "x1", x1, x0.shape[1])
    if x1.shape[0] != x0.shape[0]:
        raise ValueError(
            f"{op}: x1 must have as many rows as x0 (B={x0.shape[0]}), got shape {tuple(x1.shape)}"
        )
    if x1.device != x0.device:
        raise ValueError(f"{op}: x1 is on {x1.device}, x0 on {x0.device}")
    a, b = x0.detach().to(torch.float64), x1.detach().to(torch.float64)
    # the custom op's schema takes a float: 'exact' never reads it, so any finite stand-in does
    e = 1.0 if e is None else e
    return torch.ops.genloss.ot_coupling(a, b, method, e, float(tol), int(max_iter))


@torch.library.custom_op("genloss::ot_coupling", mutates_args=())
def _ot_coupling_op(x0: torch.Tensor, x1: torch.Tensor, method: str, eps: float, tol: float,
                    max_iter: int) -> torch.Tensor:  # fmt: skip
    """The native coupling as a custom op, so that torch.compile(fullgraph=True) keeps it in the graph."""
    return _native_ot.ot_coupling(x0, x1, method, eps, tol, max_iter)  # checks that x0 and x1 are finite


@_ot_coupling_op.register_fake
def _(x0, x1, method, eps, tol, max_iter):
    b = x0.shape[0]
    return x0.new_empty((b,), dtype=torch.int64) if method == "exact" else x0.new_empty((b, b))


__all__ += ["sinkhorn_divergence", "ot_coupling"]


# ============================================================================= prdc, sliced Wasserstein, CMMD
# prdc (MET.10-MET.13): the native k-NN kernel on CPU and CUDA tensors alike (cpp/src/knn_cpu.cpp,
# cuda/knn.cu; through DLPack, no copy). sliced_wasserstein (MET.14-MET.16): torch autograd
# through the sort, with the reference's seeded directions. cmmd (MET.17): the native MMD kernel.


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    r"""Precision, recall, density, coverage (the dict of Python floats of
    ``genloss.reference.prdc``; no gradient).  (MET.10-MET.13)

    CPU and CUDA tensors: the native k-NN kernel (``genloss.native.prdc``: cpp/src/knn_cpu.cpp,
    cuda/knn.cu), identical counts to the reference on both devices (float16 and bfloat16 are
    widened to float32 first), memory O((N + M) k), never N x M; the tie rule is ``<=``.
    """
    op = "prdc"
    _points(op, "real", real)
    _points(op, "fake", fake, real.shape[1])
    if fake.device != real.device:
        raise ValueError(f"{op}: fake is on {fake.device}, real on {real.device}")
    dtype = torch.promote_types(torch.promote_types(real.dtype, fake.dtype), torch.float32)
    return _native_ot.prdc(real.detach().to(dtype), fake.detach().to(dtype), k)


class _AbsPow(torch.autograd.Function):
    """|d|^p with the slope p |d|^(p-1) sign(d) of MET.16, NaN kept: torch.sign(NaN) is 0 and
    NaN^0 is 1, so autograd's abs()**1 would give a NaN entry a finite gradient. In the
    setup_context form, which torch.func transforms (grad, vmap) take."""

    generate_vmap_rule = True

    @staticmethod
    def forward(d, p):
        return d.abs() ** p

    @staticmethod
    def setup_context(ctx, inputs, output):
        d, ctx.p = inputs
        ctx.save_for_backward(d)

    @staticmethod
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        with torch.no_grad():
            gd = g * _abs_pow_slope(d, ctx.p)
        # once differentiable: a second derivative of sliced_wasserstein raises, never a silent 0
        return once_differentiable_grads("sliced_wasserstein", (gd,), (d,))[0], None


def _abs_pow_slope(d: torch.Tensor, p: float) -> torch.Tensor:
    """p |d|^(p-1) sign(d) (MET.16), NaN kept (``+ d * 0``: sign(NaN) is 0)."""
    return p * d.abs() ** (p - 1.0) * (torch.sign(d) + d * 0.0)


class _AbsPowTransforms(_AbsPow):
    """``_AbsPow`` with forward mode, for torch.func's wrapped tensors only: Dynamo refuses to trace
    a Function that defines ``jvp`` (torch.compile(fullgraph=True) of sliced_wasserstein broke)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _AbsPow.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, t_d, _t_p):  # forward mode (torch.func.jvp, jacfwd): the same slope times the tangent
        return _abs_pow_slope(ctx.saved_tensors[0], ctx.p) * t_d


# The directions on the device, so that a call does not copy them from the host each time (a
# transfer per call, and a host-to-device copy that CUDA graph capture refuses). One entry per
# (D, n_projections, dtype, device): the last seed's, so that a seed changed at every step holds
# one array, not one per step. A graph captured with a seed reads its array on every replay, so
# the arrays that a capture read are kept for good (one per captured configuration).
_SW_LAST: dict[tuple, tuple[int, torch.Tensor]] = {}
_SW_CAPTURED: dict[tuple, torch.Tensor] = {}


@torch.library.custom_op("genloss::sliced_wasserstein_directions", mutates_args=())
def _sw_directions(like: torch.Tensor, d: int, n_projections: int, seed: int) -> torch.Tensor:
    """The reference's seeded directions (NumPy) on ``like``'s device and dtype, made once per
    (configuration, seed) and kept (``_SW_LAST``): a custom op, so that torch.compile(fullgraph=True)
    does not trace the NumPy generator."""
    key = (d, n_projections, like.dtype, like.device)
    capturing = like.is_cuda and torch.cuda.is_current_stream_capturing()
    hit = _SW_LAST.get(key)
    if hit is None or hit[0] != seed:
        kept = _SW_CAPTURED.get((*key, seed))
        if kept is not None:
            hit = (seed, kept)
        elif capturing:
            raise ValueError(
                f"sliced_wasserstein: the directions of seed {seed} (D={d}, n_projections={n_projections}) are "
                "not on the device yet, and CUDA graph capture forbids copying them from the host: call "
                "it once with these arguments before capture (the warm-up)"
            )
        else:
            theta = _ref_ot.sliced_wasserstein_projections(d, n_projections, seed)
            with torch.inference_mode(False):  # kept for later calls, which may save it for backward
                hit = (seed, torch.from_numpy(theta).to(device=like.device, dtype=like.dtype))
        _SW_LAST[key] = hit
    if capturing:
        _SW_CAPTURED[(*key, seed)] = hit[1]
    return hit[1].clone()  # a new tensor, as a custom op's output must be (a device copy, captured)


@_sw_directions.register_fake
def _(like, d, n_projections, seed):
    return like.new_empty((n_projections, d))


def _quantile_grid(n: int, m: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """``reference.quantile_grid`` in torch ops (traceable, static size n + m): the left ends of the
    intervals in units of 1/(nm), integers, so the grid is exact. Where i m = j n both sets start an
    interval there: one of the two is empty (w = 0), which the reference's union drops."""
    left = torch.cat([torch.arange(n, device=device) * m, torch.arange(m, device=device) * n]).sort().values
    right = torch.cat([left[1:], left.new_full((1,), n * m)])
    return ((right - left).double() / (n * m)).to(dtype), left // m, left // n  # w as the reference rounds it


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, n_projections: int = 128, p: float = 2.0, seed: int = 0
) -> torch.Tensor:
    r"""Sliced p-Wasserstein distance between the empirical measures of ``x`` and ``y``.

    A 0-d tensor differentiable w.r.t. ``x`` and ``y``.  (MET.14-MET.16)

    The directions are ``genloss.reference.sliced_wasserstein_projections(D, n_projections,
    seed)`` (NumPy float64, moved to the data's device and dtype once and kept there, so a CUDA
    graph captures the call after one warm-up call), so every layer uses the same ones; the 1-D
    costs are exact on the merged quantile grid; the p-th root of the mean over directions (POT's
    convention). Autograd through ``sort`` and the gather gives the gradient of
    MET.16 (0 at SW = 0); computed in the promoted dtype of x and y (at least float32). NaN in, NaN out.
    """
    op = "sliced_wasserstein"
    _points(op, "x", x)
    _points(op, "y", y, x.shape[1])
    if y.device != x.device:
        raise ValueError(f"{op}: y is on {y.device}, x on {x.device}")
    p = _ref_ot.check_sw_p(p)
    _ref_ot.check_sw_ints(x.shape[1], n_projections, seed)
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    # autocast off: under float16 autocast the projection matmul ran in float16 and overflowed
    with torch.autocast(x.device.type, enabled=False):
        theta = torch.ops.genloss.sliced_wasserstein_directions(
            x.new_empty(0, dtype=dtype), x.shape[1], int(n_projections), int(seed)
        )
        w, iu, iv = _quantile_grid(x.shape[0], y.shape[0], x.device, dtype)
        us = torch.sort(x.to(dtype) @ theta.T, dim=0, stable=True).values
        vs = torch.sort(y.to(dtype) @ theta.T, dim=0, stable=True).values
        delta = us[iu] - vs[iv]
        # |delta|^p over- or underflows float32 long before delta does (1e20^2, 1e-25^2, 1e3^12):
        # scale by the largest gap m, SW = m (mean |delta / m|^p)^(1/p).  m is detached: the scaled
        # form equals the plain one for every constant m, so its gradient is the plain gradient.
        # A non-finite or zero m scales by 1 (inf and NaN propagate as before; 0 is the SW = 0 case).
        m = delta.detach().abs().amax()
        m = torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))
        abs_pow = _AbsPow if torch.compiler.is_compiling() or has_storage(delta) else _AbsPowTransforms
        cost = abs_pow.apply(delta / m, p)
        # (MET.14, MET.15); the grid's empty intervals (w = 0) add nothing, even where a cost overflows
        mean = torch.where(w[:, None] > 0, w[:, None] * cost, 0.0).sum(dim=0).mean()
        zero = mean == 0
        # NaN stays NaN; the root's slope at 0 is not taken
        safe = torch.where(zero, torch.ones_like(mean), mean)
        return torch.where(zero, mean * 0.0, m * safe ** (1.0 / p))  # (MET.16) gradient 0 at SW = 0


def _float64_if_mixed(bound: list) -> list:
    """float32 beside float64 features in float64 (autograd returns each gradient in its input's
    dtype), as frechet_distance, prdc, sliced_wasserstein and kid take them; the kernels need one."""
    x, y = bound
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and {x.dtype, y.dtype} == _F32_F64:
        return [x.to(torch.float64), y.to(torch.float64)]
    return bound


_F32_F64 = {torch.float32, torch.float64}
cmmd = public(
    LossOp(
        "cmmd", "Tensor x, Tensor y", _native_ot.cmmd, differentiable=("x", "y"), prepare=_float64_if_mixed
    ),
    __name__,
)

__all__ += ["prdc", "sliced_wasserstein", "cmmd"]
