"""qkd.quant.ste: the fused fake-quant kernels on any memory layout (slices, transposes, expands).

The fused functions flatten their input for the per-tensor kernels; these tests hold them against the
plain-autograd references for every kind of view a network hands a quantizer.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkd.quant import ste
from qkd.quant.ste import interval_fake_quant, interval_reference, lsq_fake_quant, lsq_reference

CL = torch.channels_last
Shape = tuple[int, int, int, int]

# layout -> (shape of the leaf tensor behind a view of shape (n, c, h, w), the view of that shape)
LAYOUTS: dict[str, tuple[Callable[[int, int, int, int], Shape], Callable[[torch.Tensor, Shape], torch.Tensor]]] = {
    "contiguous": (lambda n, c, h, w: (n, c, h, w), lambda t, s: t),
    "channels_last": (lambda n, c, h, w: (n, c, h, w), lambda t, s: t.contiguous(memory_format=CL)),
    "chunk": (lambda n, c, h, w: (n, 2 * c, h, w), lambda t, s: t.chunk(2, dim=1)[1]),
    "chunk_of_channels_last": (
        lambda n, c, h, w: (n, 2 * c, h, w),
        lambda t, s: t.contiguous(memory_format=CL)[:, : s[1]],
    ),
    "strided": (lambda n, c, h, w: (n, c, 2 * h, 3 * w), lambda t, s: t[:, :, ::2, 1::3]),
    "transposed": (lambda n, c, h, w: (n, c, w, h), lambda t, s: t.transpose(2, 3)),
    "permuted": (lambda n, c, h, w: (h, n, w, c), lambda t, s: t.permute(1, 3, 0, 2)),
    "expanded": (lambda n, c, h, w: (1, c, 1, w), lambda t, s: t.expand(s)),  # stride 0 along N and H
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(seed: int, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _input(layout: str, shape: Shape, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf tensor (gradients land there) and the view of it, of ``shape``, in ``layout``."""
    leaf_shape, view = LAYOUTS[layout]
    leaf = (_randn(seed, *leaf_shape(*shape), dtype=dtype) * 3).requires_grad_(True)
    x = view(leaf, shape)
    assert x.shape == shape
    return leaf, x


def _params(method: str, shape: Shape, per_channel: bool, bits: int, seed: int, dtype: torch.dtype):
    """Quantizer parameters and the extra arguments of ``method``'s functions."""
    pshape = (shape[0], 1, 1, 1) if per_channel else ()
    if method == "lsq":
        step = (_randn(seed, *pshape, dtype=dtype).abs() + 0.5) * 3 / 2 ** (bits - 1)
        return [step], (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 0.3)
    lower = -(_randn(seed, *pshape, dtype=dtype).abs() + 0.5)
    upper = _randn(seed + 1, *pshape, dtype=dtype).abs() + 0.5
    return [lower, upper], (2**bits, 0.3)


FUNCTIONS = {"lsq": (lsq_fake_quant, lsq_reference), "interval": (interval_fake_quant, interval_reference)}


def _run(fn, layout: str, method: str, shape: Shape, per_channel: bool, bits: int, seed: int, g_layout, dtype):
    """Output and the gradients of the leaf input and of every quantizer parameter."""
    leaf, x = _input(layout, shape, seed, dtype)
    params, extra = _params(method, shape, per_channel, bits, seed + 1, dtype)
    params = [p.requires_grad_(True) for p in params]
    y = fn(x, *params, *extra)
    g = _randn(seed + 2, *shape, dtype=dtype)
    y.backward(g.contiguous(memory_format=CL) if g_layout == "channels_last" else g)
    return x, y.detach(), [leaf.grad, *(p.grad for p in params)]


layout_cases = dict(
    layout=st.sampled_from(list(LAYOUTS)),
    method=st.sampled_from(list(FUNCTIONS)),
    shape=st.tuples(*(st.integers(1, 4) for _ in range(4))),
    per_channel=st.booleans(),
    bits=st.integers(2, 8),
    seed=st.integers(0, 2**31 - 1),
    g_layout=st.sampled_from(["contiguous", "channels_last"]),
)


@settings(max_examples=150, deadline=None)
@given(**layout_cases)
def test_fused_matches_reference_on_any_layout(layout, method, shape, per_channel, bits, seed, g_layout):
    fused, reference = FUNCTIONS[method]
    case = (layout, method, shape, per_channel, bits, seed, g_layout, torch.float64)
    x, y, grads = _run(fused, *case)
    _, y_ref, grads_ref = _run(reference, *case)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    if not per_channel and not x.is_contiguous() and x.is_contiguous(memory_format=CL):
        assert y.is_contiguous(memory_format=CL), "channels_last in, channels_last out"


def test_chunk_along_channels_regression():
    """One half of ``x.chunk(2, dim=1)``: the backward once flattened the gradient but not the input."""
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    step = torch.tensor(0.3, requires_grad=True)
    lsq_fake_quant(x.chunk(2, dim=1)[0], step, -8, 7, 0.1).sum().backward()
    assert x.grad.shape == x.shape and (x.grad[:, 3:] == 0).all() and step.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["chunk", "chunk_of_channels_last", "permuted", "expanded"])
def test_compiled_kernels_on_any_layout(layout):
    """The compiled per-tensor kernels see the same 1-D inputs as the eager ones, whatever the layout."""
    case = (layout, "lsq", (3, 4, 5, 6), False, 4, 0, "contiguous", torch.float32)
    results = {}
    try:
        for backend in ("eager", "compiled"):
            ste.set_kernel_backend(backend)
            results[backend] = [_run(FUNCTIONS[m][0], *case[:1], m, *case[2:]) for m in FUNCTIONS]
        assert ste.kernel_backend() == "compiled"  # it compiled rather than falling back
    finally:
        ste.set_kernel_backend("eager")
    for (_, y_e, g_e), (_, y_c, g_c) in zip(results["eager"], results["compiled"]):
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
