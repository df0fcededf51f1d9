"""Analytic FLOPs (``vlm_accel.eval.flops``) against hand counts for a tiny config."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from vlm_accel.eval.flops import (
    TextGeometry,
    decode_step_flops,
    fastv_paper_layer_macs,
    fastv_paper_ratio,
    layer_flops,
    planned_tokens_per_layer,
    prefill_flops,
)

# d=8, 4 query heads / 2 KV heads of size 2, MLP 16, 3 layers, vocab 10
TINY = LlamaConfig(
    hidden_size=8, num_attention_heads=4, num_key_value_heads=2, intermediate_size=16, num_hidden_layers=3,
    vocab_size=10,
)  # fmt: skip


def test_geometry_from_config_reads_gqa_and_gated_mlp():
    g = TextGeometry.from_config(TINY)
    assert (g.hidden, g.heads, g.kv_heads, g.head_dim, g.intermediate, g.layers, g.vocab) == (8, 4, 2, 2, 16, 3, 10)
    assert g.gated_mlp


def test_layer_flops_hand_count():
    g = TextGeometry.from_config(TINY)
    n = 5
    # q: 2·5·8·8 = 640; o: 640; k: 2·5·8·4 = 320; v: 320
    # QKᵀ: 2·5·5·8 = 400; P·V: 400
    # MLP (gate, up, down): 3 · 2·5·8·16 = 3840
    assert layer_flops(g, n) == 640 + 640 + 320 + 320 + 400 + 400 + 3840 == 6560
    # one decode token over a cache of 7: projections and MLP for n=1, attention 2·1·7·8 ×2
    assert layer_flops(g, 1, 7) == 128 + 128 + 64 + 64 + 112 + 112 + 768


def test_prefill_and_decode_totals():
    g = TextGeometry.from_config(TINY)
    head = 2 * 8 * 10  # LM head on one position
    assert prefill_flops(g, [5, 5, 3], batch=2) == 2 * (6560 + 6560 + layer_flops(g, 3) + head)
    assert decode_step_flops(g, [6, 6, 4]) == sum(layer_flops(g, 1, c) for c in (6, 6, 4)) + head
    with pytest.raises(ValueError, match="3 layers"):
        prefill_flops(g, [5, 5])


def test_mha_two_matrix_mlp_is_twice_the_fastv_paper_count():
    g = TextGeometry(hidden=8, heads=4, kv_heads=4, head_dim=2, intermediate=16, layers=2, vocab=10, gated_mlp=False)
    for n in (1, 5, 17):
        assert layer_flops(g, n) == 2 * fastv_paper_layer_macs(n, 8, 16)
    assert fastv_paper_layer_macs(5, 8, 16) == 4 * 5 * 64 + 2 * 25 * 8 + 2 * 5 * 8 * 16


def test_fastv_paper_ratio_and_schedule():
    # K=2 of L=4 layers at half the tokens: (2·c(n) + 2·c(n/2)) / (4·c(n))
    full, half = fastv_paper_layer_macs(10, 8, 16), fastv_paper_layer_macs(5, 8, 16)
    assert fastv_paper_ratio(10, 5, 2, 4, 8, 16) == pytest.approx((2 * full + 2 * half) / (4 * full))
    assert planned_tokens_per_layer(4, 100, 64, layer=2, kept_visual=16) == [100, 100, 52, 52]
    assert planned_tokens_per_layer(3, 10, 4) == [10, 10, 10]
    with pytest.raises(ValueError, match="layer must be in"):
        planned_tokens_per_layer(4, 100, 64, layer=4, kept_visual=16)


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        TextGeometry(hidden=8, heads=4, kv_heads=3, head_dim=2, intermediate=16, layers=2, vocab=10)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        TextGeometry(hidden=0, heads=4, kv_heads=4, head_dim=2, intermediate=16, layers=2, vocab=10)
