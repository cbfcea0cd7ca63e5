import re

import torch
from transformers import AutoModel

from xllm.blocks.qformer import QFormer


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


def test_attention_runs_through_sdpa(monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    tiny_qformer()(torch.randn(1, 7, 24))
    assert len(calls) >= 3  # self-attention in both layers, cross-attention in the first


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
    qformer.model.set_attn_implementation("eager")
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
    # Every other weight matrix came from BERT, except the text FFN (there is no text side here). Matrices only:
    # a random BERT's biases and LayerNorms equal a fresh init's (zeros and ones).
    text_ffn = re.compile(r"encoder\.layer\.\d+\.(intermediate|output)\.")
    fresh_parameters = dict(fresh.model.named_parameters())
    changed = {k for k, p in initialised.model.named_parameters() if not torch.equal(p, fresh_parameters[k])}
    matrices = {k for k, p in fresh_parameters.items() if p.ndim >= 2}
    assert changed & matrices == {k for k in matrices if "crossattention" not in k and not text_ffn.search(k)}
    # With a text side, the text FFN and the word/position tables come from BERT too.
    torch.manual_seed(0)
    fresh_text = tiny_qformer(text_vocab_size=bert["embeddings.word_embeddings.weight"].shape[0], max_text_positions=16)
    torch.manual_seed(0)
    text = tiny_qformer(text_vocab_size=bert["embeddings.word_embeddings.weight"].shape[0], max_text_positions=16,
                        bert_init=str(tiny / "bert"))
    fresh_parameters = dict(fresh_text.named_parameters())
    changed = {k for k, p in text.named_parameters() if not torch.equal(p, fresh_parameters[k])}
    matrices = {k for k, p in fresh_parameters.items() if p.ndim >= 2 and k != "query_tokens"}
    assert changed & matrices == {k for k in matrices if "crossattention" not in k}
    assert torch.equal(text.embeddings.position_embeddings.weight, bert["embeddings.position_embeddings.weight"][:16])


def test_bert_init_rejects_mismatched_width(tiny):
    import pytest

    with pytest.raises(ValueError, match="shape"):
        tiny_qformer(hidden_size=48, num_heads=2, bert_init=str(tiny / "bert"))
    with pytest.raises(FileNotFoundError, match="no BERT checkpoint"):
        tiny_qformer(bert_init=str(tiny / "missing"))


def test_instruction_queries_equal_the_full_computation(tiny):
    """The instruction path skips the last layer's unused text FFN; the query outputs must not change."""
    torch.manual_seed(0)
    qformer = tiny_qformer(text_vocab_size=40, max_text_positions=16).eval()
    features = torch.randn(3, 7, 24)
    ids = torch.randint(0, 40, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3])
    full, _ = qformer.joint(features, ids, mask)  # every layer computed whole
    assert torch.allclose(qformer(features, None, ids, mask), full, atol=1e-6)
    assert "feed_forward_chunk" not in vars(qformer.model.encoder.layer[-1])  # restored afterwards


def test_shared_passes_give_the_plain_calls_outputs_and_gradients():
    """`SharedPasses`: rows of the step's features read the cross-attention keys and values projected once, and
    ITG's text beside the recorded queries equals the joint causal pass; the gradients into every parameter add up
    to the plain calls'."""
    from xllm.blocks.qformer_sharing import SharedPasses

    torch.manual_seed(0)
    qformer = tiny_qformer(num_layers=3, cross_attention_frequency=1, text_vocab_size=50).train()
    features = torch.randn(3, 7, 24)
    ids = torch.randint(1, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    rows = torch.tensor([0, 2, 2, 1, 0])

    def step(shared: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        qformer.zero_grad(set_to_none=True)
        if shared:
            with SharedPasses(qformer, features) as passes:
                with passes.recording_queries():
                    queries = qformer(features)
                joint, _ = qformer.joint(passes.rows(rows), ids[rows], mask[rows])
                text = passes.text_after_queries(ids, mask)
        else:
            queries = qformer(features)
            joint, _ = qformer.joint(features[rows], ids[rows], mask[rows])
            _, text = qformer.joint(features, ids, mask, causal_text=True)
        outputs = [queries, joint, text]
        sum(o.pow(2).mean() for o in outputs).backward()
        return [o.detach() for o in outputs], {n: p.grad.clone() for n, p in qformer.named_parameters()
                                               if p.grad is not None}

    plain_outputs, plain_grads = step(shared=False)
    shared_outputs, shared_grads = step(shared=True)
    for plain, shared in zip(plain_outputs, shared_outputs):
        torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert set(shared_grads) == set(plain_grads)
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert "forward" not in vars(qformer.model.encoder.layer[0].crossattention.attention)  # plain layers again
