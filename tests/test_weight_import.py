"""BLIP-2 Q-Formers from transformers, LAVIS and X-LLM checkpoints land in an image interface with parity."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import Blip2Config, Blip2Model

from tests.conftest import make_image_interface
from xllm.adapters.weight_import import import_qformer_weights, read_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "lavis_parity"


def tiny_blip2(tmp_path: Path) -> Path:
    """A random transformers Blip2Model of the tiny interface's shape, saved the way the hub holds one."""
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32, cross_attention_frequency=2),
        text_config=dict(model_type="opt", hidden_size=48, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                         vocab_size=100, word_embed_proj_dim=48),
        num_query_tokens=4,
    )
    model = Blip2Model(config)
    for p in model.parameters():  # away from the init's ones and zeros, so a dropped LayerNorm shows
        p.data.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "blip2")
    return tmp_path / "blip2"


def test_a_transformers_blip2_qformer_imports_with_parity(tiny, tmp_path):
    directory = tiny_blip2(tmp_path)
    blip2 = Blip2Model.from_pretrained(directory).eval()
    interface = make_image_interface(tiny, qformer=dict(cross_attention_frequency=2))
    interface.attach(48)
    report = import_qformer_weights(interface, directory)
    assert report.layout == "blip2" and not report.missing, report.summary()
    assert "the frozen LLM" in report.ignored["language_model.model.decoder.embed_tokens.weight"]
    interface.eval()

    features = torch.randn(3, 17, 32)  # the frozen vision encoder's tokens, before BLIP-2's LayerNorm
    with torch.no_grad():
        normed = blip2.vision_model.post_layernorm(features)
        queries = blip2.query_tokens.expand(3, -1, -1)
        expected = blip2.qformer(query_embeds=queries, encoder_hidden_states=normed).last_hidden_state
        got = interface.bridge.qformer(interface.bridge.features(features))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(interface.bridge(features), blip2.language_projection(expected), atol=1e-5, rtol=0)


def test_a_checkpoint_of_another_shape_is_refused_with_both_shapes(tiny, tmp_path):
    interface = make_image_interface(tiny, qformer=dict(num_query_tokens=8, cross_attention_frequency=2))
    interface.attach(48)
    with pytest.raises(ValueError, match=r"query_tokens: checkpoint \(1, 4, 32\), interface \(1, 8, 32\)"):
        import_qformer_weights(interface, tiny_blip2(tmp_path))


def lavis_reference() -> tuple[dict, dict]:
    state = read_checkpoint(FIXTURES / "lavis_qformer.pth")
    return state, read_checkpoint(FIXTURES / "lavis_reference.pth")


def lavis_shaped_interface(tiny, **qformer):
    interface = make_image_interface(tiny, qformer=dict(hidden_size=64, layers=2, heads=4, intermediate_size=128,
                                                        num_query_tokens=8, cross_attention_frequency=2, **qformer))
    interface.attach(48)
    return interface.eval()


def test_lavis_qformer_outputs_match_lavis_own_code(tiny):
    """Reference outputs written by LAVIS's own Q-Former (tools/lavis_parity, in its pinned environment)."""
    state, reference = lavis_reference()
    interface = lavis_shaped_interface(tiny)
    report = import_qformer_weights(interface, state)
    assert report.layout == "lavis"
    assert report.missing == [k for k in report.missing if k.startswith("bridge.feature_positions")]
    with torch.no_grad():
        got = interface.bridge.qformer(interface.bridge.features(reference["image_features"]))
        torch.testing.assert_close(got, reference["query_output"], atol=1e-5, rtol=0)
        torch.testing.assert_close(interface.bridge(reference["image_features"]), reference["projected"], atol=1e-5,
                                   rtol=0)


def test_a_lavis_stage2_checkpoint_without_the_text_ffn_imports_what_is_there(tiny):
    state, reference = lavis_reference()
    # What Blip2OPT / Blip2Vicuna save (LAVIS #344): no text FFN, no word tables, no ITG head.
    stage2 = {k: v for k, v in state.items()
              if not re.search(r"\.layer\.\d+\.(intermediate|output)\.|_embeddings\.|^Qformer\.cls\.", k)}
    assert len(stage2) < len(state)
    interface = lavis_shaped_interface(tiny, text=True, text_tokenizer=str(tiny / "bert"))
    report = import_qformer_weights(interface, stage2)
    assert "bridge.qformer.model.encoder.layer.0.intermediate.dense.weight" in report.missing
    assert "bridge.qformer.embeddings.word_embeddings.weight" in report.missing
    assert not any("_query" in k or "attention" in k for k in report.missing)
    assert "missing: bridge.qformer.model.encoder.layer.0.intermediate.dense.weight" in report.summary()
    with torch.no_grad():  # the query path does not use the text FFN: outputs still match LAVIS
        got = interface.bridge.qformer(interface.bridge.features(reference["image_features"]))
    torch.testing.assert_close(got, reference["query_output"], atol=1e-5, rtol=0)


def test_an_xllm_checkpoint_imports_its_image_or_its_video_queries(tiny):
    state, _ = lavis_reference()
    xllm_state = {k: v for k, v in state.items() if not k.startswith("llm_proj")}
    xllm_state["opt_proj.weight"], xllm_state["opt_proj.bias"] = state["llm_proj.weight"], state["llm_proj.bias"]
    xllm_state["video_query_tokens"] = torch.randn_like(state["query_tokens"])
    xllm_state["video_proj.weight"], xllm_state["video_proj.bias"] = torch.randn(48, 64), torch.randn(48)
    interface = lavis_shaped_interface(tiny)
    assert import_qformer_weights(interface, xllm_state).layout == "xllm"
    torch.testing.assert_close(interface.bridge.qformer.query_tokens.data, state["query_tokens"])
    report = import_qformer_weights(interface, xllm_state, xllm_queries="video")
    torch.testing.assert_close(interface.bridge.qformer.query_tokens.data, xllm_state["video_query_tokens"])
    torch.testing.assert_close(interface.bridge.projection.weight.data, xllm_state["video_proj.weight"])
    assert report.ignored["query_tokens"] == "X-LLM's image queries and projection"


class Payload:
    """Stands for any class a pickle could name (and so import and run)."""


def test_a_pickle_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"query_tokens": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        read_checkpoint(path)
