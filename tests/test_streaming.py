"""Streaming data (`xllm.data.streaming`): JSONL shards read lazily through the loader Lightning runs
(`StatefulDataLoader`), split over ranks and workers with every record read exactly once per epoch, a position that
resumes mid-epoch, bad records named or counted, and a stage-2 run that trains and resumes from them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from tests.test_cli import fit_command, localized_configs
from tests.test_distributed import ddp_config
from tests.test_resume import logged_trainer, losses
from xllm.data.processor import ConversationProcessor
from xllm.data.records import BadSampleError, BadSamples
from xllm.data.streaming import StreamingConversations
from xllm.llm import load_tokenizer


def conversation(number: int) -> dict:
    return {"id": f"r{number}", "conversations": [{"from": "human", "value": f"What is {number} plus one?"},
                                                  {"from": "gpt", "value": f"{number + 1}"}]}


def write_shards(folder: Path, sizes: list[int]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    files, number = [], 0
    for index, size in enumerate(sizes):
        lines = []
        for _ in range(size):
            lines.append(json.dumps(conversation(number)))
            number += 1
        file = folder / f"train-{index:03d}.jsonl"
        file.write_text("\n".join(lines) + "\n")
        files.append(str(file))
    return files


def split_into_shards(source: Path, folder: Path, count: int = 3) -> None:
    """A data file's lines dealt into `count` shards, `folder/train-N.jsonl`."""
    rows = source.read_text().splitlines()
    folder.mkdir(parents=True)
    for index in range(count):
        (folder / f"train-{index}.jsonl").write_text("\n".join(rows[index::count]) + "\n")


@pytest.fixture(scope="module")
def processor(tiny) -> ConversationProcessor:
    return ConversationProcessor(load_tokenizer(str(tiny / "llama")), "vicuna_v1", {"image": -200}, {"image": 4}, 128)


def loader(processor, pattern: str, rank: int, workers: int = 2, epoch_seed: int = 0,
           bad_samples: BadSamples | None = None) -> StatefulDataLoader:
    """What `XLLMDataModule` builds for `train_shards`: the stream, 2 ranks, `workers` persistent workers."""
    stream = StreamingConversations(pattern, processor, {}, bad_samples=bad_samples, seed=epoch_seed, rank=rank,
                                    world_size=2, batch_size=3)
    return StatefulDataLoader(stream, batch_size=3, num_workers=workers, collate_fn=lambda items: items,
                              persistent_workers=workers > 0)


def ids(batches) -> list[str]:
    return [item["id"] for batch in batches for item in batch]


@pytest.mark.parametrize("sizes", [[7, 5, 9, 3, 6, 10], [20, 20]], ids=["more shards than readers", "fewer"])
def test_two_ranks_of_two_workers_read_every_record_once_per_epoch_each_in_a_new_order(processor, tmp_path, sizes):
    write_shards(tmp_path / "shards", sizes)
    pattern = str(tmp_path / "shards" / "train-*.jsonl")
    total = sum(sizes)
    epochs = {0: [], 1: []}
    batches = {}
    for rank in (0, 1):
        data = loader(processor, pattern, rank)
        for epoch in (0, 1):  # one loader over two epochs, as Lightning iterates it
            got = list(data)
            batches[rank, epoch] = len(got)
            epochs[epoch] += ids(got)
    for epoch, seen in epochs.items():
        assert Counter(seen) == Counter(f"r{n}" for n in range(total)), epoch
    assert batches[0, 0] == batches[1, 0] == batches[0, 1]  # every rank takes as many steps
    assert epochs[0] != epochs[1]  # a new order each epoch


def test_records_that_do_not_divide_over_ranks_wrap_around_so_every_rank_takes_as_many_steps(processor, tmp_path):
    write_shards(tmp_path / "shards", [4, 3])  # 7 records, 2 ranks: 4 each, one record read twice
    pattern = str(tmp_path / "shards" / "*.jsonl")
    seen = [ids(loader(processor, pattern, rank, workers=0)) for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4
    assert set(seen[0] + seen[1]) == {f"r{n}" for n in range(7)}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_rebuilt_from_its_state_mid_epoch_serves_exactly_the_rest(processor, tmp_path, workers):
    write_shards(tmp_path / "shards", [7, 5, 9, 3, 6, 10])
    pattern = str(tmp_path / "shards" / "*.jsonl")
    for rank in (0, 1):
        whole = ids(loader(processor, pattern, rank, workers))
        first = loader(processor, pattern, rank, workers)
        iterator, head = iter(first), []
        for _ in range(3):
            head += ids([next(iterator)])
        state = first.state_dict()
        resumed = loader(processor, pattern, rank, workers)
        resumed.load_state_dict(state)
        rest = ids(resumed)
        assert head + rest == whole  # the same records in the same order, none twice
        following = ids(resumed)  # then the next epoch, whole and in its own order
        assert len(following) == len(whole) and following != whole


def test_a_bad_line_is_named_by_shard_and_line_or_counted_and_skipped(processor, tmp_path):
    files = write_shards(tmp_path / "shards", [3, 3])
    with open(files[1], "a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"id": "empty", "conversations": []}) + "\n")
    pattern = str(tmp_path / "shards" / "*.jsonl")
    with pytest.raises(BadSampleError, match=r"train-001.jsonl:(4: malformed JSON|5 \(id empty\): empty)"):
        for rank in (0, 1):
            list(loader(processor, pattern, rank, workers=0, bad_samples=BadSamples("error")))
    kept, skipped = [], []
    for rank in (0, 1):
        for batch in loader(processor, pattern, rank, workers=0, bad_samples=BadSamples("skip")):
            kept += [item["id"] for item in batch if "skipped" not in item]
            skipped += [item["skipped"].reason for item in batch if "skipped" in item]
    assert sorted(kept) == [f"r{n}" for n in range(6)] and sorted(skipped) == ["empty_conversation", "malformed_json"]


@pytest.mark.slow
def test_stage2_on_two_ddp_ranks_of_two_workers_streams_through_the_feature_cache_and_resumes_mid_epoch(tiny, tmp_path):
    """`data.train_shards` through `train.py fit` on 2 DDP processes with 2 loader workers each: one pass over the
    shards fills the feature cache before training, and a run resumed from its step-2 checkpoint takes the
    uninterrupted run's steps 2 and 3 (each rank its own slice: the saved position is rank 0's, and every rank has
    served as many batches)."""
    rows = (tiny / "data" / "train_chat.jsonl").read_text().splitlines()
    shards = tmp_path / "shards"
    split_into_shards(tiny / "data" / "train_chat.jsonl", shards)
    configs = localized_configs(tiny, tmp_path / "runs", tmp_path)
    cache = tmp_path / "features"
    ddp = ddp_config(configs, tmp_path, cache)
    stream = ["--config", str(ddp), "--data.train_file", "null", "--data.train_shards", str(shards / "train-*.jsonl"),
              "--data.media_root", str(tiny / "data"), "--data.num_workers", "2", "--model.init_args.init_adapter",
              "null", "--data.batch_size", "2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for out in (whole, resumed):
        out.mkdir()
    run = fit_command(configs, 2, tmp_path, *stream,
                      "--config", str(logged_trainer(whole, 4, filename="{step}", save_top_k=-1)))
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed[-3000:]
    assert "read as a stream" in printed and "per rank per epoch" in printed
    val = (tiny / "data" / "val_chat.jsonl").read_text().splitlines()  # the stage file's val_file, read as usual
    images = {json.loads(line).get("image") for line in rows + val} - {None}
    assert len(list(cache.glob("*.safetensors"))) == len(images)  # every streamed image's features, once
    fit_command(configs, 2, tmp_path, *stream,
                "--config", str(logged_trainer(resumed, 4, filename="{step}", save_top_k=-1)),
                "--ckpt_path", str(whole / "checkpoints" / "step=2.ckpt"))
    expected, got = losses(whole), losses(resumed)
    assert sorted(expected) == [0, 1, 2, 3] and sorted(got) == [2, 3], (expected, got)
    assert all(got[step] == pytest.approx(expected[step], rel=1e-4) for step in (2, 3)), (expected, got)
