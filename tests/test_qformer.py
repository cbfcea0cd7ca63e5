import torch
from transformers import AutoModel

from xllm.interfaces.qformer import QFormer, bert_to_qformer_state_dict


def tiny_qformer(**kwargs) -> QFormer:
    args = dict(encoder_hidden_size=24, num_query_tokens=5, hidden_size=32, num_layers=2, num_heads=2,
                intermediate_size=64, cross_attention_frequency=2, dropout=0.0)
    return QFormer(**{**args, **kwargs})


def test_output_shape_and_query_init():
    torch.manual_seed(0)
    qformer = tiny_qformer(num_query_tokens=64)
    out = qformer(torch.randn(3, 7, 24))
    assert out.shape == (3, 64, 32)
    std = qformer.query_tokens.std().item()
    assert 0.015 < std < 0.025  # N(0, 0.02)
    assert qformer.model.config._attn_implementation == "sdpa"


def test_cross_attention_frequency_places_cross_attention_layers():
    qformer = tiny_qformer(num_layers=4, cross_attention_frequency=2)
    has_cross = [layer.has_cross_attention for layer in qformer.model.encoder.layer]
    assert has_cross == [True, False, True, False]


def test_queries_depend_on_image_features():
    torch.manual_seed(0)
    qformer = tiny_qformer().eval()
    features = torch.randn(2, 7, 24)
    a = qformer(features)
    b = qformer(features + torch.randn_like(features))
    assert not torch.allclose(a, b)
    assert torch.allclose(qformer(features), a)


def test_sdpa_matches_eager():
    torch.manual_seed(0)
    qformer = tiny_qformer().eval()
    features = torch.randn(2, 7, 24)
    sdpa = qformer(features)
    qformer.model.config._attn_implementation = "eager"
    eager = qformer(features)
    assert torch.allclose(sdpa, eager, atol=1e-5)


def test_bert_init_copies_self_attention_and_ffn_not_cross_attention(tiny):
    torch.manual_seed(0)
    fresh = tiny_qformer()
    torch.manual_seed(0)
    initialised = tiny_qformer(bert_init=str(tiny / "bert"))
    bert = AutoModel.from_pretrained(str(tiny / "bert")).state_dict()
    q = initialised.model.state_dict()  # Blip2QFormerModel names
    for layer in range(2):
        b, t = f"encoder.layer.{layer}.", f"encoder.layer.{layer}."
        assert torch.equal(q[t + "attention.attention.query.weight"], bert[b + "attention.self.query.weight"])
        assert torch.equal(q[t + "attention.attention.value.bias"], bert[b + "attention.self.value.bias"])
        assert torch.equal(q[t + "attention.output.dense.weight"], bert[b + "attention.output.dense.weight"])
        assert torch.equal(q[t + "intermediate_query.dense.weight"], bert[b + "intermediate.dense.weight"])
        assert torch.equal(q[t + "output_query.LayerNorm.weight"], bert[b + "output.LayerNorm.weight"])
    assert torch.equal(q["layernorm.weight"], bert["embeddings.LayerNorm.weight"])
    # Cross-attention is new: identical to the same-seed Q-Former without BERT init, and not BERT's.
    key = "encoder.layer.0.crossattention.attention.query.weight"
    assert torch.equal(q[key], fresh.model.state_dict()[key])
    mapped = bert_to_qformer_state_dict(bert, num_layers=2)
    assert not any("crossattention" in k for k in mapped)
    assert len(mapped) == 2 + 2 * 16  # embedding LayerNorm + 16 tensors per layer
    with_text = bert_to_qformer_state_dict(bert, num_layers=2, text=True)
    assert len(with_text) == 2 + 2 + 2 * 22  # + word/position tables, + 6 text-FFN tensors per layer


def test_bert_init_rejects_mismatched_width(tiny):
    import pytest

    with pytest.raises(ValueError, match="shape"):
        tiny_qformer(hidden_size=48, num_heads=2, bert_init=str(tiny / "bert"))
    with pytest.raises(FileNotFoundError, match="no BERT checkpoint"):
        tiny_qformer(bert_init=str(tiny / "missing"))
