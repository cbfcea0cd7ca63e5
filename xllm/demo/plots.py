"""The demo report's pictures: every stage's training curve and the per-category accuracies of each row, as PNG
files beside `report.md`, and the same pictures plus a table of held-out samples in an offline W&B run."""

from __future__ import annotations

import csv
from pathlib import Path

STAGE_TITLES = {"stage0": "stage 0: Q-Former without the LLM", "stage1": "stage 1: captions",
                "stage2": "stage 2: instructions"}


def training_losses(curves: Path) -> dict[str, list[tuple[int, float]]]:
    """stage -> (step, training loss) pairs, from the CSV logs the demo stages write (`curves/stageN/`)."""
    found = {}
    for metrics in sorted(curves.glob("stage*/metrics.csv")):
        with metrics.open() as handle:
            points = [(int(row["step"]), float(row["train/loss"])) for row in csv.DictReader(handle)
                      if row.get("train/loss")]
        if points:
            found[metrics.parent.name] = points
    return found


def plot_training(losses: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(losses), figsize=(4.2 * len(losses), 3.2), squeeze=False)
    for axis, (stage, points) in zip(axes[0], losses.items()):
        axis.plot([s for s, _ in points], [v for _, v in points], linewidth=1.2)
        axis.set_title(STAGE_TITLES.get(stage, stage), fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_categories(scores: dict[str, dict[str, dict]], categories: list[str], path: Path) -> Path:
    """Grouped bars: acc per category (and overall) for each row of the report (`scores[row][category]`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*categories, "all"]
    width = 0.8 / len(scores)
    figure, axis = plt.subplots(figsize=(1.5 * len(groups) + 2, 3.4))
    for index, (row, table) in enumerate(scores.items()):
        positions = [g + (index - (len(scores) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, [table[c]["acc"] for c in groups], width, label=row)
    axis.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    axis.set_xticks(range(len(groups)), groups)
    axis.set_ylim(0, 1.22)
    axis.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    axis.set_ylabel("held-out accuracy")
    axis.legend(fontsize=8, loc="upper center", ncol=len(scores) + 1, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def log_to_wandb(out: Path, name: str, pictures: dict[str, Path], samples: list[dict]) -> None:
    """One offline W&B run (`out/wandb/`) with the pictures and a table of samples: `{"media", "question",
    "reply", "reference"}`, `media` an image path (shown) or any other file's path (named)."""
    import wandb

    run = wandb.init(project="xllm", name=name, dir=str(out), mode="offline", reinit="finish_previous")
    table = wandb.Table(columns=["media", "question", "reply", "reference"])
    for sample in samples:
        media = sample["media"]
        shown = wandb.Image(media) if Path(media).suffix.lower() in (".png", ".jpg", ".jpeg") else media
        table.add_data(shown, sample["question"], sample["reply"], sample["reference"])
    run.log({**{key: wandb.Image(str(path)) for key, path in pictures.items()}, "held-out samples": table})
    run.finish()
