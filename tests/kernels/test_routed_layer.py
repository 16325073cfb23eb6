"""The edited layer's routed forward through the kernel ops: same outputs on every backend, no host
synchronisation (torch.compile with fullgraph on CPU; a CUDA-graph capture of a decode step on GPU)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memoir.layer import CallContext, MemoirLayer
from memoir_kernels import pack_bits, set_backend, unpack_bits
from memoir_kernels._native import native_available

from .helpers import kernel_device


def _layer(dim=130, hidden=24, k=40, masks=6, device="cpu", dtype=torch.float32):
    base = torch.nn.Linear(dim, hidden, bias=True).to(device=device, dtype=dtype)
    layer = MemoirLayer(base, top_k=k, irr_threshold=0.5, key_aggregation="mean", seed=3)
    layer.memory.data.normal_()
    for _ in range(masks):
        scores = torch.rand(1, dim, device=device)
        mask = torch.zeros(1, dim, dtype=torch.bool, device=device).scatter_(1, scores.topk(k, dim=1).indices, True)
        layer.add_mask(pack_bits(mask))
    return layer.eval()


@torch.no_grad()
def _routed(layer, acts, window=None):
    layer.call = CallContext(window=window)
    try:
        return layer(acts), layer.call.decision
    finally:
        layer.call = None


def _gated_batch(layer):
    """A batch whose row 0 hashes to a stored mask (its key is large exactly on that mask's
    positions before the permutation) and whose other rows are random."""
    acts = torch.randn(3, 5, layer.in_features, device=layer.memory.device)
    stored = unpack_bits(layer.bank_bits[2:3], layer.in_features)[0]
    key_positions = layer.permutation.argsort()[stored.nonzero().flatten()]  # i with perm[i] in the mask
    acts[0] = 0.01 * acts[0]
    acts[0, :, key_positions] = 5.0
    return acts


def test_routed_forward_equal_across_backends(monkeypatch):
    from memoir_kernels._triton import triton_unavailable_reason

    layer = _layer()
    acts = _gated_batch(layer)
    set_backend("torch")
    want, decision = _routed(layer, acts)
    assert decision.gate.tolist()[0] and decision.index.tolist()[0] == 2
    backends = ["auto"] + ([] if triton_unavailable_reason(torch.device("cpu")) else ["triton"])
    for name in backends:
        set_backend(name)
        got, got_decision = _routed(layer, acts)
        assert torch.equal(got_decision.index, decision.index) and torch.equal(got_decision.gate, decision.gate)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        base = layer.base_layer(acts)
        ungated = ~decision.gate
        assert torch.equal(got[ungated], base[ungated]), f"ungated rows changed under {name}"


def test_routed_forward_under_torch_compile():
    """fullgraph=True fails on any graph break, so the routed forward reads no device value."""
    layer = _layer()
    acts = _gated_batch(layer)
    want, _ = _routed(layer, acts)

    @torch.compile(fullgraph=True)
    def forward(x):
        return layer(x)

    with torch.no_grad():
        got = forward(acts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _OpLog(TorchDispatchMode):
    """Every op dispatched under it (the memoir kernels' ops and aten's), in order. Views are left
    out: they only make new tensor metadata and launch nothing."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _logged(fn, *args):
    with torch.no_grad(), _OpLog() as log:
        fn(*args)
    return log.ops


def test_routed_step_launches_three_ops_on_top_of_the_original_module(triton_backend):
    """A fresh routed step is the original module's ops, then tophash, mask_search and the routed
    down projection, nothing else: the gate comparison and the gather of the stored masks happen in
    the down projection's kernel. A decode step reusing the decision is the down projection alone."""
    device = torch.device(kernel_device())
    if not native_available(device):
        pytest.skip("the compiled mask search is not built for this device")
    layer = _layer(device=device)
    acts = _gated_batch(layer)
    window = torch.ones(acts.shape[:2], dtype=torch.bool, device=device)
    _, decision = _routed(layer, acts, window)  # first call: caches the inverse permutation
    assert decision.gate.tolist() == [True, False, False]
    try:
        layer.call = CallContext(window=window)
        fresh = _logged(layer, acts)
        step = acts[:, -1:].clone()  # one new token per sequence, as in generation
        layer.call = CallContext(reuse=decision)
        decode = _logged(layer, step)
    finally:
        layer.call = None
    without_window = _logged(layer, acts)  # no call context: every token is the prompt, no fill first
    kernels = ["memoir.tophash", "memoir.mask_search", "memoir.memoir_down_proj_routed"]
    base = _logged(layer.base_layer, acts)
    assert fresh == base + kernels
    assert without_window == base + kernels
    assert decode == _logged(layer.base_layer, step) + kernels[-1:]


def test_routed_forward_through_the_kernels_is_one_graph(triton_backend):
    """torch.compile(fullgraph=True) of the routed forward on the kernel ops (the interpreter on CPU,
    where only Dynamo's capture runs: the interpreter cannot run on the fake tensors of AOT tracing)."""
    layer = _layer(device=kernel_device())
    acts = _gated_batch(layer)
    want, decision = _routed(layer, acts)
    assert decision.gate.any()
    forward = torch.compile(layer, fullgraph=True, backend="inductor" if torch.cuda.is_available() else "eager")
    with torch.no_grad():
        got = forward(acts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_decode_step_captured_in_a_cuda_graph():
    """Prefill routes, then one decode step (reused decision) and a fresh routed step are captured
    in CUDA graphs and replayed: only possible when nothing synchronises with the host."""
    layer = _layer(dim=1536, hidden=576, k=439, masks=100, device="cuda")
    acts = _gated_batch(layer).cuda()
    want, decision = _routed(layer, acts)
    step = acts[:, -1:].clone()

    def decode(x):
        layer.call = CallContext(reuse=decision)
        try:
            return layer(x)
        finally:
            layer.call = None

    def routed(x):
        return layer(x)

    with torch.no_grad():
        for fn, x in ((decode, step), (routed, acts)):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: Triton compiles and caches outside the capture
                    fn(x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(x)
            expected = fn(x)
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(routed(acts), want, rtol=1e-4, atol=1e-4)
