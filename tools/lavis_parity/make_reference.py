"""Run in LAVIS's environment (see run.sh): LAVIS's own Q-Former, random weights, reference outputs and timings.

Builds the Q-Former the way LAVIS's `Blip2Base.init_Qformer` does (its `BertLMHeadModel` with cross-attention
every other layer and `query_length` queries), plus BLIP-2's `query_tokens`, `ln_vision` and an LLM projection;
writes them as a LAVIS-style checkpoint (`{"model": state_dict}`, `Qformer.bert.*` names) and the query outputs
for fixed image features. Then times LAVIS's forward+backward at BLIP-2's real shape (bert-base Q-Former, 32
queries, EVA-ViT-g's 257 x 1408 features) for the checker to compare with xllm's.

    python make_reference.py --out DIR [--checkpoint YOUR_LAVIS.pth] [--lavis_qformer PATH/TO/Qformer.py]

With `--checkpoint`, LAVIS's Q-Former is built in your checkpoint's shape (read from its tensors; the head count,
which tensors cannot tell, from `--heads`, default width / 64 as in BERT) and loaded with its weights instead
of random ones, and the reference outputs are computed from it.
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from torch import nn

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
             max_position_embeddings=64)
SMALL_QUERIES, SMALL_VISION, LLM_WIDTH = 8, 32, 48
REAL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30523,
            max_position_embeddings=512)
REAL_QUERIES, REAL_VISION, REAL_TOKENS, REAL_BATCH = 32, 1408, 257, 4


def lavis_qformer_module(path: str | None):
    """LAVIS's Qformer.py loaded from its file: `import lavis` would import every dataset and model LAVIS has."""
    if path is None:
        spec = importlib.util.find_spec("lavis")
        path = str(Path(spec.submodule_search_locations[0]) / "models" / "blip2_models" / "Qformer.py")
    spec = importlib.util.spec_from_file_location("lavis_qformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(qformer_module, settings: dict, queries: int, vision: int):
    """`Blip2Base.init_Qformer` with a given BertConfig instead of bert-base-uncased from the hub."""
    config = qformer_module.BertConfig(**settings)
    config.encoder_width = vision
    config.add_cross_attention = True
    config.cross_attention_freq = 2
    config.query_length = queries
    qformer = qformer_module.BertLMHeadModel(config)
    query_tokens = nn.Parameter(torch.zeros(1, queries, config.hidden_size).normal_(std=config.initializer_range))
    return qformer, query_tokens, nn.LayerNorm(vision)


def from_checkpoint(qformer_module, path: str, heads: int | None):
    """LAVIS's Q-Former in a checkpoint's shape, holding its weights."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    queries_key = "query_tokens" if "query_tokens" in state else "video_query_tokens"
    queries, vision = state[queries_key].shape[1], state["ln_vision.weight"].shape[0]
    hidden = state[queries_key].shape[2]
    prefix = "Qformer.bert."
    layers = {int(k[len(prefix):].split(".")[2]) for k in state if k.startswith(prefix + "encoder.layer.")}
    words = state.get(prefix + "embeddings.word_embeddings.weight")
    positions = state.get(prefix + "embeddings.position_embeddings.weight")
    settings = dict(hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=heads or hidden // 64,
                    intermediate_size=state[prefix + "encoder.layer.0.intermediate_query.dense.weight"].shape[0],
                    vocab_size=words.shape[0] if words is not None else REAL["vocab_size"],
                    max_position_embeddings=positions.shape[0] if positions is not None else 512)
    qformer, query_tokens, ln_vision = build(qformer_module, settings, queries, vision)
    own = {f"Qformer.{k}": v for k, v in qformer.state_dict().items()}
    missing = sorted(k for k in own if k not in state and "position_ids" not in k)
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.float())
        query_tokens.copy_(state[queries_key].float())
        ln_vision.weight.copy_(state["ln_vision.weight"].float())
        ln_vision.bias.copy_(state["ln_vision.bias"].float())
    (proj,) = [k[: -len(".weight")] for k in state if k in ("opt_proj.weight", "llm_proj.weight", "t5_proj.weight")]
    projection = nn.Linear(state[f"{proj}.weight"].shape[1], state[f"{proj}.weight"].shape[0])
    projection.load_state_dict({"weight": state[f"{proj}.weight"].float(), "bias": state[f"{proj}.bias"].float()})
    print(f"{path}: {settings}; {len(missing)} Q-Former tensors not in the checkpoint (kept random): {missing[:6]}")
    return qformer, query_tokens, ln_vision, projection, settings["num_attention_heads"]


def query_output(qformer, query_tokens, ln_vision, features):
    """What Blip2Qformer / Blip2OPT compute for images: queries read ln_vision(features) through the Q-Former."""
    image_embeds = ln_vision(features)
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    out = qformer.bert(query_embeds=query_tokens.expand(features.shape[0], -1, -1), encoder_hidden_states=image_embeds,
                       encoder_attention_mask=image_atts, return_dict=True)
    return out.last_hidden_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lavis_qformer", default=None, help="LAVIS's Qformer.py (default: the installed one)")
    parser.add_argument("--checkpoint", default=None, help="a LAVIS / X-LLM checkpoint to use instead of random weights")
    parser.add_argument("--heads", type=int, default=None, help="with --checkpoint: attention heads (default width/64)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    module = lavis_qformer_module(args.lavis_qformer)

    torch.manual_seed(0)
    if args.checkpoint:
        qformer, query_tokens, ln_vision, projection, heads = from_checkpoint(module, args.checkpoint, args.heads)
    else:
        qformer, query_tokens, ln_vision = build(module, SMALL, SMALL_QUERIES, SMALL_VISION)
        heads = SMALL["num_attention_heads"]
        projection = nn.Linear(SMALL["hidden_size"], LLM_WIDTH)
        for m in (qformer, ln_vision, projection):  # off the init's ones and zeros, so a wrong mapping shows
            for p in m.parameters():
                p.data.add_(torch.randn_like(p) * 0.05)
    for m in (qformer, ln_vision, projection):
        m.eval()
    features = torch.randn(3, 17, ln_vision.normalized_shape[0])
    with torch.no_grad():
        queries = query_output(qformer, query_tokens, ln_vision, features)
        projected = projection(queries)
    state = {"query_tokens": query_tokens.data}
    state.update({f"Qformer.{k}": v for k, v in qformer.state_dict().items()})
    state.update({f"ln_vision.{k}": v for k, v in ln_vision.state_dict().items()})
    state.update({f"llm_proj.{k}": v for k, v in projection.state_dict().items()})
    if not args.checkpoint:
        torch.save({"model": state}, out / "lavis_qformer.pth")
    (out / "shape.json").write_text(json.dumps({"num_attention_heads": heads}))
    torch.save({"image_features": features, "query_output": queries, "projected": projected},
               out / "lavis_reference.pth")

    # Speed at BLIP-2's real shape, fp32, forward + backward into the trainable parts.
    torch.manual_seed(0)
    qformer, query_tokens, ln_vision = build(module, REAL, REAL_QUERIES, REAL_VISION)
    qformer.train()
    features = torch.randn(REAL_BATCH, REAL_TOKENS, REAL_VISION)
    seconds = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        query_output(qformer, query_tokens, ln_vision, features).float().pow(2).mean().backward()
        seconds.append(time.perf_counter() - start)
    timing = {"shape": {**REAL, "queries": REAL_QUERIES, "vision_width": REAL_VISION, "vision_tokens": REAL_TOKENS,
                        "batch": REAL_BATCH}, "lavis_seconds": sorted(seconds[1:])[len(seconds[1:]) // 2],
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__}
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    print(json.dumps(timing, indent=2))


if __name__ == "__main__":
    main()
