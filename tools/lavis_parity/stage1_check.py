"""Run in xllm's environment (see run.sh): xllm's stage-1 step (`QFormerObjective`: ITC + ITM + ITG) on what
`stage1_reference.py` wrote — LAVIS's weights, image features, captions and hard negatives — its losses against
LAVIS's (exits non-zero beyond 1e-5), and its time beside LAVIS's at BLIP-2's shape.

    python stage1_check.py --reference DIR [--repeats 3]

`tests/test_pretraining.py` runs `compare` on the small fixture in tests/fixtures/lavis_parity/stage1 in `make test`.

The Q-Former comes in through `xllm.adapters.weight_import` (LAVIS layout); the stage-1 heads, which that importer
leaves out on purpose (an interface has none), are copied into the objective here. BLIP-2's settings: label
smoothing 0.1 on ITC and ITG, ITG reading [DEC] in place of [CLS]. xllm pads captions to the batch's longest, as
its collator does; LAVIS pads them to `max_txt_len` (32). The hard negatives are LAVIS's draws (xllm draws its own
in training): `sample_hard_negatives` gives them during this comparison (`lavis_negatives`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizerFast

import xllm.objectives.qformer as qformer_objective
from xllm.adapters.weight_import import import_qformer_weights, read_checkpoint
from xllm.blocks.bridge import QFormerBridge
from xllm.blocks.qformer import QFormer
from xllm.interfaces.base import MediaBatch
from xllm.objectives.qformer import QFormerObjective

class Interface(nn.Module):
    """The part of an image interface stage 0 trains, reading encoder features given in the batch."""

    def __init__(self, bridge: QFormerBridge) -> None:
        super().__init__()
        self.bridge = bridge

    def bridge_inputs(self, media: MediaBatch) -> tuple[torch.Tensor, None]:
        return media.values["features"], None


def captions_given_as_ids() -> BertTokenizerFast:
    """The text side's tokenizer, which this step never calls (captions come as LAVIS's ids): BERT's special
    tokens only, so no tokenizer files are needed."""
    folder = Path(tempfile.mkdtemp())
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    return BertTokenizerFast(str(folder / "vocab.txt"))


def build(state: dict[str, torch.Tensor], heads: int, decoder_token_id: int) -> tuple[Interface, QFormerObjective]:
    """xllm's interface and objective holding LAVIS's weights (the shape read from the tensors)."""
    words = state["Qformer.bert.embeddings.word_embeddings.weight"]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.", k))}
    qformer = QFormer(state["ln_vision.weight"].shape[0], num_query_tokens=state["query_tokens"].shape[1],
                      hidden_size=words.shape[1], num_layers=len(layers), num_heads=heads,
                      intermediate_size=state["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
                      cross_attention_frequency=2, dropout=0.0, text_vocab_size=words.shape[0],
                      max_text_positions=state["Qformer.bert.embeddings.position_embeddings.weight"].shape[0])
    interface = Interface(QFormerBridge(qformer, captions_given_as_ids()))
    report = import_qformer_weights(interface, state, layout="lavis")
    assert not report.missing, report.summary()
    # xllm keeps BERT's word and position tables frozen, as a Q-Former started from `bert_init` has them (LAVIS
    # trains them: a dense 30523 x 768 gradient a step): the same losses, less work.
    qformer.embeddings.requires_grad_(False)
    objective = QFormerObjective(embed_dim=state["vision_proj.weight"].shape[0], label_smoothing=0.1,
                                 decoder_token_id=decoder_token_id, flipped_negatives=False, instruction_aware=False)
    objective.bind(interface)
    heads = {"vision_proj.weight": "vision_proj.weight", "vision_proj.bias": "vision_proj.bias",
             "text_proj.weight": "text_proj.weight", "text_proj.bias": "text_proj.bias",
             "itm_head.weight": "itm_head.weight", "itm_head.bias": "itm_head.bias",
             "Qformer.cls.predictions.transform.dense.weight": "lm_transform.0.weight",
             "Qformer.cls.predictions.transform.dense.bias": "lm_transform.0.bias",
             "Qformer.cls.predictions.transform.LayerNorm.weight": "lm_transform.2.weight",
             "Qformer.cls.predictions.transform.LayerNorm.bias": "lm_transform.2.bias",
             "Qformer.cls.predictions.bias": "lm_bias"}
    own = dict(objective.named_parameters())
    with torch.no_grad():
        for lavis_name, name in heads.items():
            own[name].copy_(state[lavis_name])
        objective.temperature.fill_(float(state["temp"]))
    return interface.train(), objective.train()


def batch_of(reference: dict) -> dict:
    texts = reference["texts"]
    longest = max(len(t) for t in texts)  # xllm's collator pads to the batch's longest caption
    ids = torch.zeros(len(texts), longest, dtype=torch.long)
    for row, text in enumerate(texts):
        ids[row, :len(text)] = text
    return {"media": MediaBatch({"features": reference["features"]}), "text_ids": ids, "text_mask": (ids != 0).long(),
            "pair_keys": [str(t.tolist()) for t in texts]}


@contextmanager
def lavis_negatives(reference: dict) -> Iterator[None]:
    """Within the block, xllm's objective takes LAVIS's hard negatives instead of drawing its own."""
    drawn = [reference["neg_text_for_image"], reference["neg_image_for_text"]]  # xllm draws texts first, then images
    calls = iter(range(10**9))
    original = qformer_objective.sample_hard_negatives
    qformer_objective.sample_hard_negatives = lambda similarity, positives, generator=None: drawn[next(calls) % 2]
    try:
        yield
    finally:
        qformer_objective.sample_hard_negatives = original


def compare(folder: Path) -> tuple[Interface, QFormerObjective, dict, dict, dict[str, tuple[float, float]]]:
    """xllm's step on LAVIS's weights, features, captions and hard negatives: (interface, objective, batch,
    reference, {loss: (LAVIS, xllm)})."""
    state = {k: v.float() for k, v in read_checkpoint(folder / "stage1_lavis.pth").items()}
    reference = torch.load(folder / "stage1_reference.pth", weights_only=True)
    interface, objective = build(state, int(reference["num_attention_heads"]), int(reference["decoder_token_id"]))
    batch = batch_of(reference)
    with lavis_negatives(reference):
        out = objective(interface, batch)
    names = {"itc": "loss_itc", "itm": "loss_itm", "itg": "loss_lm"}
    return interface, objective, batch, reference, {n: (float(reference["losses"][key]), float(out.metrics[n].detach()))
                                                    for n, key in names.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, help="the folder stage1_reference.py wrote")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = Path(args.reference)
    interface, objective, batch, reference, losses = compare(folder)
    print("losses, LAVIS / xllm: " + ", ".join(f"{n} {a:.6f} / {b:.6f}" for n, (a, b) in losses.items()))
    relative = max(abs(a - b) / max(1.0, abs(a)) for a, b in losses.values())
    print(f"max |Δ| / max(1, |loss|): {relative:.1e}")

    seconds = []
    with lavis_negatives(reference):
        for _ in range(args.repeats + 1):
            interface.zero_grad(set_to_none=True)
            objective.zero_grad(set_to_none=True)
            start = time.perf_counter()
            objective(interface, batch).loss.backward()
            seconds.append(time.perf_counter() - start)
    timing = json.loads((folder / "stage1_timing.json").read_text())
    lavis, xllm = timing["lavis_step_seconds"], sorted(seconds[1:])[len(seconds[1:]) // 2]
    print(f"stage-1 step (ITC + ITM + ITG, forward + backward), batch {timing['batch']}, captions of "
          f"{timing['caption_tokens']} tokens, {torch.get_num_threads()} threads")
    print(f"  LAVIS {lavis:.3f} s (median of {[round(x, 3) for x in timing['all_seconds']]}, transformers "
          f"{timing['transformers']})")
    print(f"  xllm  {xllm:.3f} s (median of {[round(x, 3) for x in seconds[1:]]})")
    print(f"  LAVIS / xllm = {lavis / xllm:.2f}")
    sys.exit(0 if relative <= 1e-5 else 1)


if __name__ == "__main__":
    main()
