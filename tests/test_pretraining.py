"""Stage 0: BLIP-2's ITC/ITM/ITG on the Q-Former, and instruction-aware queries."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.conftest import make_image_interface
from xllm.interfaces.qformer import itg_attention_mask
from xllm.interfaces.qformer_pretraining import QFormerPretrainer, itc_loss, sample_hard_negatives
from xllm.training import XLLMDataModule, XLLMModule


def test_itc_matches_a_hand_computation_on_3x3():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(3, 2, 4), dim=-1)  # 3 images, 2 queries
    text = F.normalize(torch.randn(3, 4), dim=-1)
    temperature = torch.tensor(0.1)
    loss, sim_i2t, sim_t2i = itc_loss(image, text, temperature, torch.eye(3, dtype=torch.bool))

    sim = [[max(float(image[i, q] @ text[t]) for q in range(2)) / 0.1 for t in range(3)] for i in range(3)]
    def ce(row, target):
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))
    i2t = sum(ce(sim[i], i) for i in range(3)) / 3
    t2i = sum(ce([sim[i][t] for i in range(3)], t) for t in range(3)) / 3
    assert math.isclose(loss.item(), (i2t + t2i) / 2, rel_tol=1e-5)
    assert torch.allclose(sim_i2t, torch.tensor(sim), atol=1e-5) and torch.equal(sim_t2i, sim_i2t.t())


def test_itc_identical_texts_share_the_target():
    image = F.normalize(torch.randn(2, 1, 4), dim=-1)
    text = F.normalize(torch.randn(1, 4), dim=-1).expand(2, 4)  # both images have the same caption
    positives = torch.ones(2, 2, dtype=torch.bool)
    loss, _, _ = itc_loss(image, text, torch.tensor(0.1), positives)
    # Half the mass on each of two equal logits per text row: loss is log 2 for that direction at least.
    assert loss.item() >= math.log(2) / 2 - 1e-6


def test_itm_negatives_are_never_positives():
    generator = torch.Generator().manual_seed(0)
    keys = ["a", "b", "a", "c", "d", "b"]
    positives = torch.tensor([[x == y for y in keys] for x in keys])
    similarity = torch.randn(6, 6) * 5 + torch.eye(6) * 50  # the positive dominates the softmax
    for _ in range(200):
        picks = sample_hard_negatives(similarity, positives, generator)
        assert all(not positives[row, pick] for row, pick in enumerate(picks.tolist()))
    only_positives = torch.ones(2, 2, dtype=torch.bool)
    assert sample_hard_negatives(torch.zeros(2, 2), only_positives).tolist() == [-1, -1]


def test_itg_mask_values():
    text_mask = torch.tensor([[1, 1, 0]])
    mask = itg_attention_mask(text_mask, n_query=2, dtype=torch.float32)[0, 0]
    allowed = (mask == 0).int().tolist()
    assert allowed == [
        [1, 1, 0, 0, 0],  # queries see queries only
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # text 0 sees queries + itself
        [1, 1, 1, 1, 0],  # text 1 sees queries + text 0..1
        [1, 1, 1, 1, 0],  # padding is never a key
    ]


def test_itg_queries_ignore_text_and_text_is_causal(tiny):
    interface = make_image_interface(tiny, qformer_text=True, bert_init=str(tiny / "bert")).eval()
    features = torch.randn(2, 17, 32)
    ids, mask = interface.tokenize_text(["is the shape red? yes", "a blue circle."])
    changed = ids.clone()
    changed[:, -2] = 7  # perturb a late text token
    with torch.no_grad():
        queries_a, text_a = interface.qformer.joint(features, ids, mask, causal_text=True)
        queries_b, text_b = interface.qformer.joint(features, changed, mask, causal_text=True)
        queries_bi, _ = interface.qformer.joint(features, changed, mask, causal_text=False)
    assert torch.allclose(queries_a, queries_b, atol=1e-6)  # queries never see text
    assert torch.allclose(text_a[:, :-2], text_b[:, :-2], atol=1e-6)  # earlier text never sees later text
    assert not torch.allclose(text_a[:, -2], text_b[:, -2])
    assert not torch.allclose(queries_a, queries_bi, atol=1e-4)  # ITM's bidirectional mask does let them see it
    # ...and text does see the queries: other image features change the text outputs.
    with torch.no_grad():
        _, text_c = interface.qformer.joint(features + 1.0, ids, mask, causal_text=True)
    assert not torch.allclose(text_a, text_c, atol=1e-4)


def test_instruction_changes_the_queries(tiny):
    interface = make_image_interface(tiny, qformer_text=True, instruction_aware=True, bert_init=str(tiny / "bert"))
    interface.attach(16)
    interface.eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = interface(pixels, ["is the shape red?", "is the shape red?"])
        b = interface(pixels, ["is the shape blue?", "is the shape red?"])
    assert a.shape == (2, 4, 16)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)
    with pytest.raises(ValueError, match="one instruction text per image"):
        interface(pixels)


def test_pretrainer_losses_fall_and_switch_off(tiny):
    torch.manual_seed(0)
    interface = make_image_interface(tiny, qformer_text=True, instruction_aware=True, bert_init=str(tiny / "bert"))
    pretrainer = QFormerPretrainer(interface, embed_dim=16, itg_weight=0.0, instruction_aware=True)
    pixels = torch.stack([interface.load_media(str(tiny / "data" / "images" / f"train_{i:04d}.png")) for i in range(0, 96, 12)])
    texts = [f"a {c} {s}." for c in ("red", "green", "blue", "yellow") for s in ("square", "circle")]
    ids, mask = interface.tokenize_text(texts)
    out = pretrainer(pixels, ids, mask, texts, ids, mask)
    assert out.itg is None and out.itc is not None and out.itm is not None
    assert torch.isclose(out.loss, out.itc + out.itm)
    pretrainer = QFormerPretrainer(interface, embed_dim=16, itm_weight=0.0, itg_weight=0.0, instruction_aware=True)
    # lr 1e-3: at 3e-3 the loss fell then jumped back on some CPUs (chaotic); at 1e-3 over 8 seeds the
    # loss after 40 steps was 0.02-0.31 of the first.
    optimizer = torch.optim.AdamW([p for p in pretrainer.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for _ in range(40):
        out = pretrainer(pixels, ids, mask, texts, ids, mask)
        first = first if first is not None else out.itc.item()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.itc.item() < 0.7 * first


def test_stage0_never_creates_an_llm_and_feeds_stage1(tiny, tmp_path, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("stage 0 must not load an LLM")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
        torch.manual_seed(0)
        module = XLLMModule(
            llm=None, stage=0, adapter_dir=str(tmp_path / "stage0"), lr=1e-3,
            interfaces={"image": make_image_interface(tiny, qformer_text=True, instruction_aware=True,
                                                      bert_init=str(tiny / "bert"))},
        )
        assert module.model is None and not any("llm" in n for n, _ in module.named_parameters())
        trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
        trainer.fit(module, datamodule=XLLMDataModule(train_file=str(tiny / "data" / "train_yesno.jsonl"), batch_size=8))
        assert {"train/itc", "train/itm", "train/itg"} <= set(trainer.logged_metrics)

    saved = load_file(str(tmp_path / "stage0" / "adapter.safetensors"))
    assert saved and all(k.startswith("interfaces.image.") for k in saved)
    assert not any("word_embeddings" in k for k in saved)  # frozen BERT table stays out

    stage1 = XLLMModule(
        llm=str(tiny / "llama"), stage=1, template="vicuna_v1", init_adapter=str(tmp_path / "stage0"),
        interfaces={"image": make_image_interface(tiny, qformer_text=True, instruction_aware=True,
                                                  bert_init=str(tiny / "bert"))},
    )
    state = stage1.model.trainable_state_dict()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
