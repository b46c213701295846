"""channels_last (any dense permutation of the non-batch dims) inputs to the torch ops whose
registry record is ``layout_free`` (genloss.registry.core.OpRecord.layout_free): the torch layer
hands them to the kernels as permuted contiguous views (torch/_op.py, ``dense_order``) instead of
copying them. What must hold, for every such op and case: the value and the gradients are those
of the same call on contiguous inputs (the value up to the order of each sample's sums), the
gradients come back in the inputs' layout (autograd's permute backward: a view, no copy), an
elementwise value in that layout too; mixed, sliced and broadcast layouts take the copy path."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("genloss._C")

import genloss.torch as gt  # noqa: E402
from genloss import registry as R  # noqa: E402
from genloss.torch._op import dense_order  # noqa: E402

SIZES = R.ODD_SIZES[2]  # '...' = (3, 2, 5): (B, 3, 2, 5) arrays, so channels_last applies
# (torch composites such as flow_interpolant are torch's arithmetic: their layouts are torch's)
CASES = [
    (r, v, red) for r, v, red in R.cases() if r.layout_free and hasattr(getattr(gt, r.torch_op_name), "op")
]
IDS = [f"{r.name}-{v.id}-{red}" for r, v, red in CASES]


def test_the_layout_free_ops_are_the_flattening_ones():
    names = {r.name for r in R.RECORDS if r.layout_free}
    assert {"l1_loss", "eps_mse_loss", "flow_matching_loss", "denoiser_loss", "q_sample"} <= names
    # broadcasting arguments, several trailing shapes, tuple outputs: each dim keeps its meaning
    assert not names & {
        "gaussian_nll",
        "normal_kl",
        "cycle_consistency_loss",
        "mmd2",
        "feature_matching_loss",
    }


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("record", "variant", "reduction"), CASES, ids=IDS)
def test_channels_last_inputs_are_viewed_not_copied(record, variant, reduction):
    rng = np.random.default_rng(0)
    arrays = R.make_inputs(record, rng, np.float64, SIZES, variant)
    kwargs = R.call_kwargs(record, variant, reduction)
    data = {a.name for a in record.args if len(a.shape) == 2}
    diff = set(record.differentiable)

    def run(layout):
        ts = []
        for a, x in zip(record.args, arrays, strict=True):
            t = torch.from_numpy(np.array(x, copy=True))
            if a.name in data and t.ndim == 4:
                t = layout(t)
            ts.append(t.requires_grad_(a.name in diff and t.is_floating_point()))
        value = record.torch(*ts, **kwargs)
        leaves = [t for t in ts if t.requires_grad]
        grads = torch.autograd.grad(value.sum(), leaves) if leaves else ()
        return ts, value, leaves, grads

    _, v0, _, g0 = run(lambda t: t)
    ts, v1, leaves, g1 = run(_channels_last)
    assert any(not t.is_contiguous() for t in ts), "no channels_last input in this case"
    label = f"{record.name}({variant.id}, {reduction})"
    torch.testing.assert_close(v1, v0, rtol=1e-12, atol=1e-12 * float(v0.detach().abs().max()), msg=label)
    if v1.ndim == 4:  # an elementwise value: in the inputs' layout
        assert v1.stride() == _channels_last(v0).stride(), label
    for t, a, b in zip(leaves, g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()), msg=label)
        assert a.stride() == t.stride(), f"{label}: a gradient not in its input's layout (a copy)"


def test_dense_order_takes_only_one_shared_dense_layout():
    x = _channels_last(torch.randn(4, 3, 5, 6))
    assert dense_order([x, _channels_last(torch.randn(2, 3, 5, 6)), torch.randn(4)]) == [0, 2, 3, 1]
    assert dense_order([torch.randn(4, 3, 5, 6), x]) is None  # the first is contiguous: as before
    assert dense_order([x, torch.randn(4, 3, 5, 6)]) is None  # mixed layouts
    assert dense_order([x[:, :, :, :4]]) is None  # a slice is not dense
    assert dense_order([x, _channels_last(torch.randn(4, 3, 5, 7))]) is None  # other trailing dims
    wide = torch.randn(4, 5, 6, 3).permute(0, 3, 1, 2)[:, :, :, :]
    assert dense_order([wide, x]) == [0, 2, 3, 1]
    assert dense_order([torch.randn(6, 4).t()]) is None  # a transposed matrix: batch not outermost


def test_mixed_and_broadcast_layouts_still_give_the_contiguous_result():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64)
    y = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64)
    want = gt.l1_loss(x, y)
    for a, b in (
        (_channels_last(x), y),
        (x, _channels_last(y)),
        (_channels_last(x), y[:1].expand_as(y) + 0 * y),
    ):
        torch.testing.assert_close(gt.l1_loss(a, b), gt.l1_loss(a.contiguous(), b.contiguous()))
    torch.testing.assert_close(gt.l1_loss(_channels_last(x), _channels_last(y)), want, rtol=1e-14, atol=0)
