"""Training: frozen parts stay frozen, loss falls, adapters and checkpoints hold trainable tensors only."""

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from tests.conftest import make_image_interface, make_model, text_side
from xllm.data.dataset import ConversationDataset, build_tokenized_dataset
from xllm.llm import LoraSettings
from xllm.model import XLLM
from xllm.training import XLLMDataModule, XLLMModule


def fixed_batch(model, tiny, n=8, file="train_chat.jsonl"):
    rows = build_tokenized_dataset(str(tiny / "data" / file), model.processor(max_length=256).text)
    loaders = {m: i.media_loader() for m, i in model.interfaces.items()}
    dataset = ConversationDataset(rows, loaders)
    return model.processor().collator([dataset[i] for i in range(0, len(dataset), len(dataset) // n)][:n])


@pytest.mark.parametrize("llm,template", [("llama", "vicuna_v1"), ("glm", "glm4")])
def test_loss_falls_on_a_fixed_batch(tiny, llm, template):
    model = make_model(tiny, llm=llm, template=template, qformer=text_side(tiny))
    model.train()
    batch = fixed_batch(model, tiny, file="train_captions.jsonl")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(batch["input_ids"], batch["attention_mask"], batch["media"], batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Measured: 0.876 (llama) and 0.775 (glm) of the first loss; with no gradient reaching the interface, 1.0.
    assert losses[-1] < 0.93 * losses[0], losses


def small_module(tiny, tmp_path, stage=1, lora=None, init_adapter=None):
    torch.manual_seed(0)
    return XLLMModule(
        llm=str(tiny / "llama"), interfaces={"image": make_image_interface(tiny)}, stage=stage,
        template="vicuna_v1", lora=lora, init_adapter=init_adapter, adapter_dir=str(tmp_path / f"adapter{stage}"),
        lr=1e-3, max_length=256,
    )


def fit(module, tiny, tmp_path, steps=3, file="train_captions.jsonl"):
    data = XLLMDataModule(train_file=str(tiny / "data" / file), batch_size=4)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=data)
    return trainer


def frozen_names(module):
    return {n for n, p in module.model.named_parameters() if not p.requires_grad}


def test_frozen_parameters_stay_frozen_and_outside_the_optimizer(tiny, tmp_path):
    module = small_module(tiny, tmp_path)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    frozen = frozen_names(module)
    assert any(n.startswith("llm.") for n in frozen) and any(".encoder." in n for n in frozen)
    assert not any(n.startswith("llm.") for n in module.model.trainable_state_dict())

    trainer = fit(module, tiny, tmp_path)
    after = dict(module.model.named_parameters())
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    changed = [n for n in module.model.trainable_state_dict() if not torch.equal(before[n], after[n])]
    assert "interfaces.image.bridge.qformer.query_tokens" in changed
    assert "interfaces.image.bridge.projection.weight" in changed

    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    named = dict(module.model.named_parameters())
    assert optimized == {id(named[n]) for n in module.model.trainable_state_dict()}
    # Frozen modules stay in eval mode even while Lightning has the model in train mode.
    module.train()
    assert not module.model.llm.training and not module.model.interfaces["image"].encoder.training
    assert module.model.interfaces["image"].bridge.qformer.training


def test_no_weight_decay_on_norms_biases_and_queries(tiny, tmp_path):
    module = small_module(tiny, tmp_path)
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "interfaces.image.bridge.qformer.query_tokens" in no_decay_names
    assert "interfaces.image.bridge.ln_features.weight" in no_decay_names
    assert all(names[id(p)].endswith("weight") for p in decay["params"])
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0


def test_adapter_and_checkpoint_hold_only_trainable_tensors(tiny, tmp_path):
    module = small_module(tiny, tmp_path)
    trainer = fit(module, tiny, tmp_path)
    trainable = set(module.model.trainable_state_dict())
    saved = load_file(str(tmp_path / "adapter1" / "adapter.safetensors"))
    assert set(saved) == trainable

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {"model." + k for k in trainable}

    # The adapter reloads through the public path and gives the same outputs as the trained model.
    reloaded = XLLM.from_pretrained(tmp_path / "adapter1")
    module.model.eval()
    batch = fixed_batch(module.model, tiny, n=2)
    with torch.no_grad():
        expected = module.model(batch["input_ids"], batch["attention_mask"], batch["media"]).logits
        got = reloaded(batch["input_ids"], batch["attention_mask"], batch["media"]).logits
    assert torch.allclose(expected, got, atol=1e-5)


def test_stage2_lora_starts_from_stage1_adapter(tiny, tmp_path):
    stage1 = small_module(tiny, tmp_path)
    fit(stage1, tiny, tmp_path, steps=2)
    stage1_weights = load_file(str(tmp_path / "adapter1" / "adapter.safetensors"))

    stage2 = small_module(tiny, tmp_path, stage=2, lora=LoraSettings(r=2, alpha=4), init_adapter=str(tmp_path / "adapter1"))
    state = stage2.model.trainable_state_dict()
    for key, tensor in stage1_weights.items():
        assert torch.equal(state[key], tensor), key
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys and all(k.startswith("llm.") for k in lora_keys)
    stage2.train()  # as Lightning does: the frozen LLM stays in eval, LoRA's dropout trains
    modes = {n: m.training for n, m in stage2.model.llm.named_modules()}
    assert any(v for n, v in modes.items() if "lora_dropout" in n)
    assert not any(v for n, v in modes.items() if n.endswith("self_attn") or n.endswith("mlp"))
    base_before = {n: p.detach().clone() for n, p in stage2.model.llm.named_parameters() if not p.requires_grad}
    fit(stage2, tiny, tmp_path, steps=2, file="train_chat.jsonl")
    for name, parameter in stage2.model.llm.named_parameters():
        if name in base_before:
            assert torch.equal(parameter, base_before[name]), name
    saved = load_file(str(tmp_path / "adapter2" / "adapter.safetensors"))
    assert set(saved) == set(stage2.model.trainable_state_dict())
    reloaded = XLLM.from_pretrained(tmp_path / "adapter2").eval()
    assert reloaded.lora is not None
    # The reloaded adapter (LoRA included) computes what the trained model computes.
    batch = fixed_batch(stage2.model, tiny, n=4)
    stage2.model.eval()
    with torch.no_grad():
        trained = stage2.model(batch["input_ids"], batch["attention_mask"], batch["media"]).logits
        again = reloaded(batch["input_ids"], batch["attention_mask"], batch["media"]).logits
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=1e-5)


def test_lora_in_stage1_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="stage 2"):
        small_module(tiny, tmp_path, stage=1, lora=LoraSettings())


def test_adapter_refuses_foreign_class_paths(tiny, tmp_path):
    import json

    model = make_model(tiny)
    directory = model.save_pretrained(tmp_path / "adapter")
    config = json.loads((directory / "config.json").read_text())
    config["interfaces"]["image"]["class_path"] = "os.system"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not one of xllm's interfaces"):
        XLLM.from_pretrained(directory)


def test_chat_answers_about_media_and_uses_it(tiny):
    model = make_model(tiny, qformer=text_side(tiny)).eval()
    images = [str(tiny / "data" / "images" / f"train_0000{i}.png") for i in range(3)]
    one = [{"from": "user", "value": "<image>\nDescribe the image briefly."}]
    two = [{"role": "user", "content": "Hi <image> and <image>?"}]  # OpenAI-style turns work too
    answers = model.reply([one, two], [{"image": images[0]}, {"image": images[1:]}], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(text, str) for text in answers)
    # Greedy replies are deterministic, and a batch gives each conversation what it gives alone.
    assert model.chat(one, {"image": images[0]}, max_new_tokens=4) == answers[0]
    assert model.chat(two, {"image": images[1:]}, max_new_tokens=4) == answers[1]
    # The image reaches the LLM: other images change the first reply token's logits.
    batch_a, batch_b = model.processor()([one], [{"image": images[0]}]), model.processor()([one], [{"image": images[2]}])
    logits_a = model.generate_ids(batch_a, 1, do_sample=False, output_logits=True).logits[0]
    logits_b = model.generate_ids(batch_b, 1, do_sample=False, output_logits=True).logits[0]
    assert not torch.allclose(logits_a, logits_b)
    with pytest.raises(ValueError, match="has interfaces for \\['image'\\] only"):
        model.chat(one, {"audio": "x.wav"})


@pytest.mark.parametrize("instruction_aware", [True, False])
def test_every_parameter_stages_1_2_train_gets_a_gradient_as_ddp_requires(tiny, instruction_aware):
    # The Q-Former's text side that only stage-0 losses read (all of it without instructions, the last layer's
    # text FFN with them) stays out of training here; it would otherwise stop DDP.
    model = make_model(tiny, qformer=text_side(tiny, instruction_aware))
    batch = fixed_batch(model, tiny, n=4, file="train_chat.jsonl")
    model.train()
    model(batch["input_ids"], batch["attention_mask"], batch["media"], batch["labels"]).loss.backward()
    assert [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert sum(p.requires_grad for p in model.parameters()) > 10


def test_interface_tokens_land_at_the_image_placeholders(tiny):
    model = make_model(tiny).eval()
    batch = fixed_batch(model, tiny, n=2)
    with torch.no_grad():
        image_tokens = model.interfaces["image"](batch["media"]["image"]).embeds
        embeds, mask, labels = model.embed_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])
    for row in range(2):
        position = int((batch["input_ids"][row] == model.sentinels["image"]).nonzero()[0])
        assert torch.allclose(embeds[row, position:position + 4], image_tokens[row])
        assert (labels[row, position:position + 4] == -100).all()
        text = model.llm.get_input_embeddings()(batch["input_ids"][row, :position])
        assert torch.equal(embeds[row, :position], text)


def test_vision_tower_of_a_dual_model_checkpoint(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from xllm.encoders.vision import FrozenVisionEncoder

    config = CLIPConfig(
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
        vision_config={"hidden_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 48,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(tmp_path / "clip")
    encoder = FrozenVisionEncoder(str(tmp_path / "clip"))
    assert type(encoder.model).__name__.startswith("CLIPVision") and encoder.hidden_size == 24
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.model.training
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 17, 24)


def test_throughput_logger_reports_rates_and_mfu(tiny, tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    from xllm.training.throughput import ThroughputLogger

    module = small_module(tiny, tmp_path)
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ThroughputLogger(peak_tflops=1.0)],
    )
    trainer.fit(module, datamodule=XLLMDataModule(train_file=str(tiny / "data" / "train_captions.jsonl"), batch_size=4))
    metrics = trainer.logged_metrics
    assert metrics["perf/sequences_per_s"] > 0 and metrics["perf/tokens_per_s"] > metrics["perf/sequences_per_s"]
    assert torch.isclose(metrics["perf/mfu"], metrics["perf/tflops"])
    # Tokens are the real LLM positions: each caption's text plus its image's 4 query tokens, no padding.
    batch = fixed_batch(module.model, tiny, n=4, file="train_captions.jsonl")
    out = module.model(batch["input_ids"], batch["attention_mask"], batch["media"], batch["labels"])
    assert out.media_tokens == 16 and out.tokens == int(batch["attention_mask"].sum()) - 4 + 16


@pytest.mark.parametrize("llm,template,lora", [("llama", "vicuna_v1", False), ("glm", "glm4", True)])
def test_loss_on_supervised_positions_equals_the_llm_own_loss(tiny, llm, template, lora):
    """Training computes logits only where a label is predicted; the loss and its gradients must equal the
    LLM's own loss on full logits."""
    model = make_model(tiny, llm=llm, template=template)
    if lora:
        model.enable_lora(LoraSettings(r=2, alpha=4, dropout=0.0))
    model.eval()
    batch = fixed_batch(model, tiny, n=4)
    out = model(batch["input_ids"], batch["attention_mask"], batch["media"], batch["labels"])
    assert out.logits.shape[0] == int((batch["labels"] != -100).sum())  # one row per supervised token
    embeds, mask, labels = model.embed_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])
    full = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss
    assert torch.allclose(out.loss, full, atol=1e-5)
    weight = model.interfaces["image"].bridge.projection.weight
    (fast,) = torch.autograd.grad(out.loss, weight)
    (slow,) = torch.autograd.grad(full, weight)
    assert torch.allclose(fast, slow, atol=1e-6)


def test_a_nonfinite_loss_skips_its_step_and_too_many_in_a_row_stop_the_run(tiny, tmp_path):
    from safetensors.torch import save_file

    def module_with_nan_features(images: list[str], **training) -> XLLMModule:
        """Stage 1 over cached features, where the cached features of `images` are NaN (a corrupted cache file, an
        fp16 overflow upstream): batches holding them give a NaN loss."""
        torch.manual_seed(0)
        interface = make_image_interface(tiny, feature_cache=str(tmp_path / "features"))
        module = XLLMModule(llm=str(tiny / "llama"), interfaces={"image": interface}, stage=1, template="vicuna_v1",
                            adapter_dir=str(tmp_path / "adapter"), lr=1e-3, max_length=256, **training)
        interface.prepare_media(images)
        for image in images:
            file = interface.cache.file_for(image)
            save_file({"features": torch.full_like(load_file(str(file))["features"], float("nan"))}, str(file))
        return module

    def fit_one_epoch(module: XLLMModule) -> pl.Trainer:
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
        trainer.fit(module, datamodule=XLLMDataModule(train_file=str(tiny / "data" / "train_captions.jsonl"),
                                                      batch_size=4))
        return trainer

    images = tiny / "data" / "images"
    module = module_with_nan_features([str(images / "train_00000.png")])
    trainer = fit_one_epoch(module)  # 32 captions, 8 batches: one holds the NaN image
    assert module.nonfinite_losses == 1 and trainer.global_step == 8  # Lightning counts the skipped step too
    assert all(torch.isfinite(p).all() for p in module.model.parameters() if p.requires_grad)

    module = module_with_nan_features([str(images / f"train_{i:05d}.png") for i in range(32)], max_nonfinite_in_a_row=2)
    stopped = r"2 non-finite training loss\(es\) in a row, the last step 1: loss nan on records train-"
    with pytest.raises(FloatingPointError, match=stopped):
        fit_one_epoch(module)


def test_resuming_continues_and_a_checkpoint_missing_a_trainable_tensor_is_refused(tiny, tmp_path):
    def trainer(steps: int) -> pl.Trainer:
        return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))

    def data() -> XLLMDataModule:
        return XLLMDataModule(train_file=str(tiny / "data" / "train_captions.jsonl"), batch_size=4)

    first = trainer(2)
    first.fit(small_module(tiny, tmp_path), datamodule=data())
    checkpoint = tmp_path / "last.ckpt"
    first.save_checkpoint(checkpoint)

    resumed = trainer(4)
    resumed.fit(small_module(tiny, tmp_path), datamodule=data(), ckpt_path=str(checkpoint))
    assert resumed.global_step == 4

    state = torch.load(checkpoint, weights_only=True)
    dropped = sorted(state["state_dict"])[0]
    del state["state_dict"][dropped]
    torch.save(state, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match=f"1 trainable tensor\\(s\\) missing: {dropped}"):
        trainer(4).fit(small_module(tiny, tmp_path), datamodule=data(), ckpt_path=str(tmp_path / "broken.ckpt"))
