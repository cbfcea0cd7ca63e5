"""Two CPU processes over gloo: stage 0's ITC with the other rank's texts and images as negatives is the loss and
gradient of one process on the whole batch (what `gather_with_grad` is for); stages 0 and 2 run under Lightning's
DDP, the feature cache filled once, and stage 0 resumed from a mid-run checkpoint takes the uninterrupted steps."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from tests.test_cli import fit_command, localized_configs
from tests.test_resume import logged_trainer, losses
from xllm.objectives.qformer import gather_with_grad, itc_loss, itc_similarity

WORLD, PER_RANK = 2, 3


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(WORLD * PER_RANK, 2, 8, generator=generator).requires_grad_()  # 2 queries per image
    text = torch.randn(WORLD * PER_RANK, 8, generator=generator).requires_grad_()
    return image, text


def itc(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Our rows' ITC against every rank's rows, as `QFormerObjective` computes it (distinct texts)."""
    image_embeds, text_embeds = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    all_text, offset = gather_with_grad(text_embeds)
    all_image, _ = gather_with_grad(image_embeds)
    positives = torch.zeros(len(text), len(all_text), dtype=torch.bool)
    positives[:, offset:offset + len(text)] = torch.eye(len(text), dtype=torch.bool)
    sim_i2t = itc_similarity(image_embeds, all_text) / 0.07
    sim_t2i = itc_similarity(all_image, text_embeds).t() / 0.07
    return itc_loss(sim_i2t, sim_t2i, positives)


def rank_process(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        image, text = inputs()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        loss = itc(image[rows], text[rows])
        loss.backward()
        # What DDP does with the gradients: the mean over ranks (and the logged loss: its mean over ranks).
        mean_loss = loss.detach().clone()
        for tensor in (image.grad, text.grad, mean_loss):
            dist.all_reduce(tensor)
            tensor /= WORLD
        if rank == 0:
            torch.save({"loss": mean_loss, "image": image.grad, "text": text.grad}, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_loss_and_gradients_of_one_process_on_the_whole_batch(tmp_path):
    out = str(tmp_path / "ranks.pt")
    mp.spawn(rank_process, args=(str(tmp_path / "init"), out), nprocs=WORLD, join=True)
    ranks = torch.load(out, weights_only=True)

    image, text = inputs()
    loss = itc(image, text)  # one process, no process group: the whole batch
    loss.backward()
    assert torch.allclose(ranks["loss"], loss.detach(), atol=1e-6)
    assert torch.allclose(ranks["image"], image.grad, atol=1e-6)
    assert torch.allclose(ranks["text"], text.grad, atol=1e-6)


def ddp_config(configs: Path, tmp_path: Path, cache: Path) -> Path:
    """Two CPU processes (gloo) for a few steps, the tiny image interface reading a feature cache (an interface
    given on the command line or in a later file replaces the whole spec, so the whole spec is repeated)."""
    common = yaml.safe_load((configs / "common.yaml").read_text())
    image = common["model"]["init_args"]["interfaces"]["image"]
    image["init_args"]["feature_cache"] = str(cache)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump({
        "trainer": {"devices": 2, "strategy": "ddp", "max_steps": 3, "logger": False, "num_sanity_val_steps": 0},
        "model": {"init_args": {"interfaces": {"image": image}}},
    }))
    return path


@pytest.mark.slow
def test_stage0_and_stage2_train_under_two_process_ddp_with_one_cache_fill_and_one_adapter(tiny, tmp_path):
    runs, cache = tmp_path / "runs", tmp_path / "features"
    configs = localized_configs(tiny, runs, tmp_path)
    ddp = ddp_config(configs, tmp_path, cache)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for out in (whole, resumed):
        out.mkdir()
    # Stage 0 for 4 steps, every step's loss in a CSV and a checkpoint after every step (`step=N.ckpt`).
    stage0 = fit_command(configs, 0, tmp_path, "--config", str(ddp),
                         "--config", str(logged_trainer(whole, 4, filename="{step}", save_top_k=-1)))
    printed = stage0.stdout + stage0.stderr
    # Rank 0 encodes each file once (train, then val); rank 1 waits for it and finds every file cached.
    fills = re.findall(r"feature cache .*: encoded (\d+) image file\(s\)", printed)
    images = {json.loads(line)["image"] for split in ("train", "val")
              for line in (tiny / "data" / f"{split}_yesno.jsonl").read_text().splitlines()}
    assert len(fills) == 2 and sum(map(int, fills)) == len(images), fills
    assert len(list(cache.glob("*.safetensors"))) == len(images) and not list(cache.glob("*.partial"))
    assert printed.count("adapter written to") == 1 and "Trainer.fit` stopped: `max_steps=4` reached" in printed

    # Resumed from its step-2 checkpoint, the run takes the uninterrupted run's steps 2 and 3: each rank the next
    # batches of its own shard (red when Lightning rebuilt the loader around its sampler: the resume crashed).
    fit_command(configs, 0, tmp_path, "--config", str(ddp),
                "--config", str(logged_trainer(resumed, 4, filename="{step}", save_top_k=-1)),
                "--ckpt_path", str(whole / "checkpoints" / "step=2.ckpt"))
    expected, got = losses(whole), losses(resumed)
    assert sorted(expected) == [0, 1, 2, 3] and sorted(got) == [2, 3], (expected, got)
    assert all(got[step] == pytest.approx(expected[step], rel=1e-4) for step in (2, 3)), (expected, got)

    stage2 = fit_command(configs, 2, tmp_path, "--config", str(ddp), "--model.init_args.init_adapter", "null")
    assert stage2.returncode == 0
    keys = set(load_file(str(runs / "tiny_stage2" / "adapter" / "adapter.safetensors")))
    assert any("lora_" in k for k in keys) and all(k.startswith("interfaces.image.") or "lora_" in k for k in keys)
    assert "3 optimizer steps" in (runs / "tiny_stage2" / "adapter" / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "sharded"])
def test_stage2_on_two_ranks_with_a_modality_missing_from_a_rank_batch(tiny, tmp_path, strategy):
    """Image and speech interfaces, two weighted data sources (`train_sources`) such that most batches hold no audio.
    Under 2-process DDP a rank whose batch lacks a modality, and a C-Former whose CIF weights the LLM's loss never
    reaches, still give every trained parameter a (zero) gradient, so the run trains and writes its adapter (without
    the zero term DDP stops at the second step: "parameters that were not used in producing the loss"; seen once).
    Sharded, each interface and each encoder layer is an FSDP2 unit: a rank lacking audio runs the speech interface
    on a stand-in item, or the other rank waits for ever on its gather (seen: the run hung without it)."""
    runs = tmp_path / "runs"
    configs = localized_configs(tiny, runs, tmp_path)
    sources = []
    for name, file, lines, weight in (("images", "train_chat.jsonl", 20, 1.0), ("audio", "train_asr.jsonl", 2, 0.5)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join((tiny / "data" / file).read_text().splitlines()[:lines]) + "\n")
        sources.append({"file": str(path), "weight": weight, "media_root": str(tiny / "data")})
    common = yaml.safe_load((configs / "common.yaml").read_text())
    interfaces = {"image": common["model"]["init_args"]["interfaces"]["image"],
                  "audio": {"class_path": "xllm.interfaces.SpeechInterface",
                            "init_args": {"encoder": str(tiny / "whisper"), "hidden_size": 16, "num_layers": 1,
                                          "num_heads": 2, "intermediate_size": 32, "max_tokens": 64}}}
    ddp = tmp_path / "ddp_mixed.yaml"
    ddp.write_text(yaml.safe_dump({
        "trainer": {"devices": 2, "max_steps": 5, "logger": False, "num_sanity_val_steps": 0,
                    "strategy": "ddp" if strategy == "ddp" else {"class_path": "xllm.training.sharding.ShardedStrategy"}},
        "model": {"init_args": {"interfaces": interfaces, "init_adapter": None, "lora": None}},
        "data": {"train_file": None, "train_sources": sources, "epoch_size": 12, "val_file": None, "batch_size": 1}}))
    stage2 = fit_command(configs, 2, tmp_path, "--config", str(ddp))
    assert "adapter written to" in stage2.stdout + stage2.stderr
    keys = set(load_file(str(runs / "tiny_stage2" / "adapter" / "adapter.safetensors")))
    assert any(k.startswith("interfaces.audio.") for k in keys) and any(k.startswith("interfaces.image.") for k in keys)
