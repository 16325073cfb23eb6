"""End-to-end decode latency: unedited model vs the same model with an edited MLP layer holding 1k
and 10k stored masks. GPU: LLaMA-3-8B's shape with random bf16 weights; CPU: a small LLaMA.

    python -m pytest benchmarks/bench_decode.py --benchmark-only

One decode step (one new token per sequence, KV cache of a 16-token prompt, batch 1). The edited
layer routes at prefill and reuses that decision for the step, as `generate` does; the routed
step (TopHash + search + edited projection on the new token) is measured as well.
"""

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from memoir.layer import CallContext, MemoirLayer  # noqa: E402
from memoir_kernels import pack_bits  # noqa: E402

CUDA = torch.cuda.is_available()
if CUDA:  # LLaMA-3-8B
    SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
    EDITED, TOP_K = 27, 4096
else:  # SmolLM2-135M-sized
    SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152)
    EDITED, TOP_K = 22, 439
PROMPT = 16
_models: dict = {}


def _model():
    if "model" not in _models:
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPE, max_position_embeddings=256)
        # Built in place: an 8B model initialised in fp32 on the host first would need 32 GB and minutes.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if CUDA else torch.float32)
        try:
            with torch.device("cuda" if CUDA else "cpu"):
                model = LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)
        _models["model"] = model
    return _models["model"]


def _edit(model, masks):
    """Wrap the edited layer's down projection (or unwrap it for masks=0) with a random memory."""
    mlp = model.model.layers[EDITED].mlp
    base = mlp.down_proj.base_layer if isinstance(mlp.down_proj, MemoirLayer) else mlp.down_proj
    if masks == 0:
        mlp.down_proj = base
        return None
    layer = MemoirLayer(base, top_k=TOP_K, irr_threshold=0.0, key_aggregation="mean", seed=1)
    layer.memory.data.normal_(std=1e-3)
    dim = layer.in_features
    generator = torch.Generator().manual_seed(masks)
    bits = []
    for start in range(0, masks, 1000):
        scores = torch.rand(min(1000, masks - start), dim, generator=generator)
        bits.append(pack_bits(torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(TOP_K, 1).indices, True)))
    layer.bank_bits = torch.cat(bits).to(base.weight.device)
    mlp.down_proj = layer
    return layer


@pytest.mark.parametrize("routing", ["reuse", "route-each-step"])
@pytest.mark.parametrize("masks", [pytest.param(m, id=f"masks{m}") for m in (0, 1000, 10000)])
@torch.no_grad()
def test_decode_step(benchmark, record, sync, masks, routing):
    if masks == 0 and routing != "reuse":
        pytest.skip("the unedited model has no routing")
    model = _model()
    layer = _edit(model, masks)
    device = model.device
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, PROMPT), device=device)
    cache = DynamicCache()
    if layer is not None:
        layer.call = CallContext(window=torch.ones_like(prompt, dtype=torch.bool))
    model(input_ids=prompt, past_key_values=cache, use_cache=True)
    decision = layer.call.decision if layer is not None else None
    step = torch.randint(0, SHAPE["vocab_size"], (1, 1), device=device)

    def decode():
        if layer is not None:
            layer.call = CallContext(reuse=decision) if routing == "reuse" else None
        out = model(input_ids=step, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the new token: every step sees the same 16-token cache
        return out.logits

    benchmark.group = f"decode step ({'GPU 8B-shape bf16' if CUDA else 'CPU small'})"
    benchmark.pedantic(sync(decode), rounds=10 if not CUDA else 100, warmup_rounds=2)
    record(masks=masks, routing=routing, layers=SHAPE["num_hidden_layers"], hidden=SHAPE["hidden_size"])
    _edit(model, 0)
