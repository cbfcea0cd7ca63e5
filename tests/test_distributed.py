"""Two CPU processes over gloo: stage 0's ITC with the other rank's texts and images as negatives is the loss and
gradient of one process on the whole batch (what `gather_with_grad` is for)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from xllm.pretraining.qformer import gather_with_grad, itc_loss, itc_similarity

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
