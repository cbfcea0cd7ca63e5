"""Run in LAVIS's environment (see run.sh): LAVIS's whole stage-1 step (`Blip2Qformer.forward`: ITC + ITM with
hard negatives + ITG) at BLIP-2's shape, its losses, its hard negatives and its time, for `stage1_check.py`.

LAVIS's own `forward` runs, its source read from LAVIS's file (`import lavis` would import every dataset and model
LAVIS has, and builds EVA-ViT-g and a hub tokenizer): the method is executed on an object holding what
`Blip2Qformer.__init__` builds — its `BertLMHeadModel` Q-Former (`Blip2Base.init_Qformer`, random weights, vocabulary
with BLIP-2's added [DEC]), query tokens, `ln_vision`, ITC projections, ITM head, temperature — with the frozen
image encoder's output given as the "image" (the encoder is not part of the step's trained work) and captions given
as token ids (a stand-in tokenizer pads them to `max_txt_len` as BERT's does). One process group of one rank, as
LAVIS's gathers need one.

    python stage1_reference.py --out DIR [--batch 4] [--repeats 3]
    python stage1_reference.py --out tests/fixtures/lavis_parity/stage1 --small   (the fixture `make test` reads)

`--small` builds a small Q-Former (64 wide, 2 layers, a 120-token vocabulary) and skips the timing: its files are
small enough to commit, so `make test` checks xllm's stage-1 losses against LAVIS's without LAVIS installed.
"""

import argparse
import ast
import importlib.util
import json
import os
import tempfile
import textwrap
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# BLIP-2's shape (bert-base + BLIP-2's added [DEC], 32 queries over EVA-ViT-g's 257 x 1408 tokens), and a small one.
SHAPES = {
    "real": dict(bert=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           vocab_size=30523, max_position_embeddings=512),
                 queries=32, vision=1408, tokens=257, embed=256, max_txt_len=32, dec=30522, cls=101, sep=102,
                 words=(1000, 30000), lengths=(12, 21)),
    "small": dict(bert=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            vocab_size=120, max_position_embeddings=64),
                  queries=8, vision=32, tokens=17, embed=16, max_txt_len=12, dec=119, cls=2, sep=3,
                  words=(5, 110), lengths=(5, 11)),
}
PAD = 0


def lavis_file(*parts: str) -> Path:
    return Path(importlib.util.find_spec("lavis").submodule_search_locations[0]).joinpath(*parts)


def lavis_functions(path: Path, names: set[str], namespace: dict) -> dict:
    """Top-level functions/classes (or `Class.method`) of a LAVIS file, decorators included, run in `namespace`."""
    lines = path.read_text().splitlines()
    for node in ast.parse("\n".join(lines)).body:
        found = [node] if getattr(node, "name", None) in names else []
        if isinstance(node, ast.ClassDef):
            found += [m for m in node.body if isinstance(m, ast.FunctionDef) and f"{node.name}.{m.name}" in names]
        for item in found:
            first = min([item.lineno] + [d.lineno for d in getattr(item, "decorator_list", [])])
            exec(compile(textwrap.dedent("\n".join(lines[first - 1:item.end_lineno])), str(path), "exec"), namespace)
    return namespace


class Tokens:
    """What LAVIS's tokenizer call returns (`input_ids`, `attention_mask`, `.to`)."""

    def __init__(self, ids: list[list[int]], length: int):
        self.input_ids = torch.tensor([row + [PAD] * (length - len(row)) for row in ids])
        self.attention_mask = (self.input_ids != PAD).long()

    def to(self, device):
        return self


class Tokenizer:
    """BERT's tokenizer as LAVIS calls it, on captions given as ids (`[CLS] ... [SEP]`), padded to max_length."""

    def __init__(self, shape: dict):
        self.bos_token_id, self.pad_token_id, self.max_txt_len = shape["dec"], PAD, shape["max_txt_len"]

    def __call__(self, text, padding, truncation, max_length, return_tensors):
        assert padding == "max_length" and max_length == self.max_txt_len
        return Tokens(text, max_length)


def captions(batch: int, shape: dict, generator: torch.Generator) -> list[list[int]]:
    """Caption lengths with [CLS] and [SEP]; at BLIP-2's shape 12-20 tokens, COCO-like (~10.5 words a caption)."""
    lengths = torch.randint(*shape["lengths"], (batch,), generator=generator).tolist()
    return [[shape["cls"]] + torch.randint(*shape["words"], (n - 2,), generator=generator).tolist() + [shape["sep"]]
            for n in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a small Q-Former, no timing (the test fixture)")
    args = parser.parse_args()
    shape = SHAPES["small" if args.small else "real"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0, world_size=1)

    spec = importlib.util.spec_from_file_location("lavis_qformer", lavis_file("models", "blip2_models", "Qformer.py"))
    qformer_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qformer_module)
    namespace = {"torch": torch, "nn": nn, "F": F, "dist": dist,
                 "is_dist_avail_and_initialized": lambda: dist.is_available() and dist.is_initialized(),
                 "BlipOutput": lambda **losses: losses}
    lavis_functions(lavis_file("models", "base_model.py"), {"GatherLayer", "all_gather_with_grad",
                                                              "concat_all_gather"}, namespace)
    lavis_functions(lavis_file("models", "blip2_models", "blip2_qformer.py"), {"Blip2Qformer.forward"}, namespace)

    torch.manual_seed(0)
    config = qformer_module.BertConfig(**shape["bert"])
    config.encoder_width, config.add_cross_attention, config.cross_attention_freq = shape["vision"], True, 2
    config.query_length = shape["queries"]
    width = shape["bert"]["hidden_size"]
    model = nn.Module()
    model.visual_encoder = nn.Identity()  # the "image" is the frozen encoder's output
    model.ln_vision = nn.LayerNorm(shape["vision"])
    model.Qformer = qformer_module.BertLMHeadModel(config)
    model.query_tokens = nn.Parameter(torch.zeros(1, shape["queries"], width).normal_(std=0.02))
    model.vision_proj, model.text_proj = nn.Linear(width, shape["embed"]), nn.Linear(width, shape["embed"])
    model.itm_head = nn.Linear(width, 2)
    model.temp = nn.Parameter(0.07 * torch.ones([]))
    model.tokenizer, model.max_txt_len = Tokenizer(shape), shape["max_txt_len"]
    for p in model.parameters():  # off the init's ones and zeros, so a wrongly mapped tensor shows in the losses
        p.data.add_(torch.randn_like(p) * 0.01)
    model.train()  # as LAVIS trains, with dropout off (config below) so that xllm's step can repeat it exactly
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    forward = namespace["forward"].__get__(model)

    generator = torch.Generator().manual_seed(1)
    features = torch.randn(args.batch, shape["tokens"], shape["vision"], generator=generator)
    texts = captions(args.batch, shape, generator)
    picks: list[int] = []
    multinomial = torch.multinomial

    def recording(weights, n, *rest, **kwargs):  # LAVIS draws each hard negative with torch.multinomial
        drawn = multinomial(weights, n, *rest, **kwargs)
        picks.append(int(drawn))
        return drawn

    torch.multinomial = recording
    torch.manual_seed(2)
    losses = forward({"image": features, "text_input": texts})
    torch.multinomial = multinomial
    state = {"query_tokens": model.query_tokens.data, "temp": model.temp.data}
    for name in ("Qformer", "ln_vision", "vision_proj", "text_proj", "itm_head"):
        state.update({f"{name}.{k}": v for k, v in getattr(model, name).state_dict().items()})
    torch.save({"model": state}, out / "stage1_lavis.pth")
    torch.save({"features": features, "texts": [torch.tensor(t) for t in texts],
                "neg_image_for_text": torch.tensor(picks[:args.batch]),
                "neg_text_for_image": torch.tensor(picks[args.batch:]),
                "losses": {k: v.detach() for k, v in losses.items()}, "decoder_token_id": torch.tensor(shape["dec"]),
                "num_attention_heads": torch.tensor(shape["bert"]["num_attention_heads"])},
               out / "stage1_reference.pth")
    print({k: float(v) for k, v in losses.items()})
    if args.small:
        dist.destroy_process_group()
        os._exit(0)

    seconds = []
    for _ in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        forward({"image": features, "text_input": texts})["loss"].backward()
        seconds.append(time.perf_counter() - start)
    timing = {"batch": args.batch, "caption_tokens": [len(t) for t in texts], "max_txt_len": shape["max_txt_len"],
              "lavis_step_seconds": sorted(seconds[1:])[len(seconds[1:]) // 2], "all_seconds": seconds[1:],
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__}
    (out / "stage1_timing.json").write_text(json.dumps(timing, indent=2))
    print(json.dumps({**timing, "losses": {k: float(v) for k, v in losses.items()}}, indent=2))
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
