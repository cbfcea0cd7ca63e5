"""Import a trained BLIP-2 Q-Former into an image interface: transformers BLIP-2, LAVIS and X-LLM checkpoints.

Each layout is one rename table, read top to bottom: the first pattern a key matches decides its fate — a new
name inside the `ImageInterface` (`bridge.qformer.*`, `bridge.ln_features.*`, `bridge.projection.*`), or
`None` with the reason it is not imported (the frozen encoder, the LLM, stage-1 heads xllm's interface does not
have). A key no row matches is an error, as is a shape that differs; trainable tensors of the interface that the
checkpoint does not provide are reported (LAVIS stage-2 checkpoints drop the Q-Former's text FFN and word tables,
LAVIS #344: what is there is imported, what is missing is listed).

Files are read with safetensors or `torch.load(weights_only=True)`: a pickle that needs anything beyond
tensors and plain containers is refused, never executed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import nn

from xllm.blocks.bridge import QFormerSettings
from xllm.frozen import safetensors_files
from xllm.interfaces.image import ImageInterface

Layout = Literal["blip2", "lavis", "xllm"]
Rule = tuple[str, str | None, str]  # (pattern, target or None, why)

_QF = "bridge.qformer.model."
# BERT-style layer names (LAVIS, X-LLM) -> transformers' Blip2QFormerModel names.
_LAVIS_LAYERS: list[Rule] = [
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", _QF + r"layernorm.\1", "query/text LayerNorm"),
    (r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.weight", r"bridge.qformer.embeddings.\1_embeddings.weight",
     "text side's tables"),
    (r"Qformer\.bert\.embeddings\.position_ids", None, "a buffer, rebuilt"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
     _QF + r"encoder.layer.\1.\2.attention.\3.\4", "attention"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
     _QF + r"encoder.layer.\1.\2.output.\3.\4", "attention output"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(intermediate|intermediate_query)\.dense\.(weight|bias)",
     _QF + r"encoder.layer.\1.\2.dense.\3", "FFN in"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(output|output_query)\.(dense|LayerNorm)\.(weight|bias)",
     _QF + r"encoder.layer.\1.\2.\3.\4", "FFN out"),
    (r"Qformer\.cls\..*", None, "stage-1 ITG language-model head (xllm's objective has its own)"),
    (r"ln_vision\.(weight|bias)", r"bridge.ln_features.\1", "LayerNorm on the frozen encoder's features"),
    (r"(vision_proj|text_proj|itm_head)\..*|temp", None, "stage-1 ITC/ITM heads (xllm's objective has its own)"),
    (r"visual_encoder\..*", None, "the frozen vision encoder: load it as the interface's encoder"),
]

TABLES: dict[str, list[Rule]] = {
    # transformers' Blip2Model / Blip2ForConditionalGeneration (see its convert_blip_2_original_to_pytorch.py).
    "blip2": [
        (r"query_tokens", "bridge.qformer.query_tokens", "learned queries"),
        (r"qformer\.embeddings\.(word|position)_embeddings\.weight", r"bridge.qformer.embeddings.\1_embeddings.weight",
         "text side's tables"),
        (r"qformer\.embeddings\.position_ids", None, "a buffer, rebuilt"),
        (r"qformer\.(layernorm|encoder)\.(.+)", _QF + r"\1.\2", "the Q-Former"),
        # BLIP-2's ln_vision became the vision model's post_layernorm in transformers.
        (r"vision_model\.post_layernorm\.(weight|bias)", r"bridge.ln_features.\1", "LayerNorm on encoder features"),
        (r"vision_model\..*", None, "the frozen vision encoder: load it as the interface's encoder"),
        (r"language_projection\.(weight|bias)", r"bridge.projection.\1", "projection into the LLM"),
        (r"language_model\..*", None, "the frozen LLM"),
    ],
    "lavis": [
        (r"query_tokens", "bridge.qformer.query_tokens", "learned queries"),
        *_LAVIS_LAYERS,
        (r"(opt_proj|llm_proj|t5_proj)\.(weight|bias)", r"bridge.projection.\2", "projection into the LLM"),
        (r"(opt_model|llm_model|t5_model)\..*", None, "the frozen LLM"),
    ],
}

# X-LLM: a LAVIS-shaped image interface (its projection is `opt_proj` even for ChatGLM); its video interface shares
# the Q-Former with queries and a projection of its own. `xllm_queries` picks which pair is imported.
_XLLM_SHARED: list[Rule] = [
    *_LAVIS_LAYERS,
    (r"opt_model\..*", None, "the frozen LLM"),
    (r"(speech|Cformer|cformer|cif|audio)[._].*", None, "X-LLM's speech interface"),
]
TABLES["xllm"] = [
    (r"query_tokens", "bridge.qformer.query_tokens", "image queries"),
    (r"opt_proj\.(weight|bias)", r"bridge.projection.\1", "image projection into the LLM"),
    (r"video_query_tokens|video_proj\..*", None, "X-LLM's video queries and projection"),
    *_XLLM_SHARED,
]
XLLM_VIDEO_TABLE: list[Rule] = [
    (r"video_query_tokens", "bridge.qformer.query_tokens", "video queries"),
    (r"video_proj\.(weight|bias)", r"bridge.projection.\1", "video projection into the LLM"),
    (r"query_tokens|opt_proj\..*", None, "X-LLM's image queries and projection"),
    *_XLLM_SHARED,
]


# The Q-Former's text side: its word/position tables and each layer's text FFN (queries use `*_query`).
TEXT_SIDE = re.compile(r"bridge\.qformer\.(embeddings\.|model\.encoder\.layer\.\d+\.(intermediate|output)\.)")


@dataclass
class ImportReport:
    """What an import did: `loaded` interface keys, `missing` trainable keys the checkpoint lacked, `ignored`
    checkpoint keys with the reason."""

    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for why in self.ignored.values():
            reasons[why] = reasons.get(why, 0) + 1
        lines = [f"{self.layout}: {len(self.loaded)} tensors imported, {len(self.missing)} trainable tensors missing"]
        lines += [f"  missing: {key}" for key in self.missing]
        lines += [f"  ignored {n}: {why}" for why, n in sorted(reasons.items())]
        return "\n".join(lines)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: a transformers directory (safetensors, sharded or not), a `.safetensors` file, or
    a `.pth`/`.pt`/`.bin` read with `weights_only=True` (LAVIS and X-LLM keep the state dict under `"model"`)."""
    path = Path(path)
    if path.is_dir():
        state: dict[str, torch.Tensor] = {}
        for file in safetensors_files(path):
            state.update(load_file(str(file)))
        return state
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling error names the class it refused
        raise ValueError(f"{path}: not loadable with torch.load(weights_only=True) (refusing to unpickle code): "
                         f"{err}") from err
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or one under 'model')")
    return state


def detect_layout(state: Mapping[str, torch.Tensor]) -> Layout:
    """`blip2` (transformers names), `xllm` (LAVIS names + video queries) or `lavis`."""
    if any(k.startswith("qformer.") for k in state):
        return "blip2"
    if any(k.startswith("Qformer.bert.") for k in state):
        return "xllm" if "video_query_tokens" in state else "lavis"
    raise ValueError("not a BLIP-2 Q-Former checkpoint: no 'qformer.*' (transformers) or 'Qformer.bert.*' "
                     f"(LAVIS / X-LLM) keys; first keys: {sorted(state)[:5]}")


def rename(state: Mapping[str, torch.Tensor], layout: Layout, xllm_queries: Literal["image", "video"] = "image"
           ) -> tuple[dict[str, tuple[str, torch.Tensor]], dict[str, str]]:
    """`(new name -> (checkpoint key, tensor), ignored key -> why)` by the layout's table; a key no row matches is
    an error."""
    rules = XLLM_VIDEO_TABLE if layout == "xllm" and xllm_queries == "video" else TABLES[layout]
    renamed, ignored, unknown = {}, {}, []
    for key, tensor in state.items():
        for pattern, target, why in rules:
            if re.fullmatch(pattern, key):
                if target is None:
                    ignored[key] = why
                else:
                    renamed[re.sub(pattern, target, key)] = (key, tensor)
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{layout} checkpoint: {len(unknown)} keys no rule of the table maps: {sorted(unknown)[:8]}")
    return renamed, ignored


def import_qformer_weights(
    interface: ImageInterface | nn.Module,
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    layout: Layout | None = None,
    xllm_queries: Literal["image", "video"] = "image",
) -> ImportReport:
    """Copy a BLIP-2 / LAVIS / X-LLM Q-Former (+ its LayerNorm and projection) into `interface`.

    Args:
        interface: the image interface (or any module whose `bridge` is a `QFormerBridge`), shaped like the checkpoint (query count, Q-Former width, depth, heads,
            FFN width, cross-attention frequency, encoder width; `projection: linear`). Attach it to an LLM
            width first (an `XLLM` does) to import the projection too.
        checkpoint: a path (see `read_checkpoint`) or a state dict.
        layout: `blip2`, `lavis` or `xllm`; detected from the keys when None.
        xllm_queries: for X-LLM checkpoints, import its image queries/projection or its video ones.
    """
    state = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else dict(checkpoint)
    layout = layout or detect_layout(state)
    renamed, ignored = rename(state, layout, xllm_queries)
    own = dict(interface.named_parameters())
    has_text = interface.bridge.qformer.has_text
    for target, (key, _) in list(renamed.items()):
        if target.startswith("bridge.projection.") and interface.bridge.projection is None:
            ignored[key] = "projection: the interface is not attached to an LLM yet"
        elif not has_text and TEXT_SIDE.match(target):
            ignored[key] = "the Q-Former's text side (this interface has none: qformer_text: false)"
        else:
            continue
        del renamed[target]
    not_there = sorted(set(renamed) - set(own))
    if not_there:
        raise KeyError(f"{layout} checkpoint: {len(not_there)} tensors have no place in this interface (deeper "
                       f"layers? an MLP projection?): {not_there[:8]}")
    wrong = [f"{k}: checkpoint {tuple(v.shape)}, interface {tuple(own[k].shape)}"
             for k, (_, v) in renamed.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{layout} checkpoint does not fit this interface's shape ({len(wrong)} tensors): "
                         + "; ".join(wrong[:5]))
    with torch.no_grad():
        for target, (_, tensor) in renamed.items():
            own[target].copy_(tensor.to(own[target].dtype))
    missing = sorted(k for k, p in own.items() if p.requires_grad and k not in renamed)
    return ImportReport(layout, sorted(renamed), missing, ignored)


def import_to_checkpoint(
    checkpoint: str,
    encoder: str,
    out: str,
    qformer: QFormerSettings | None = None,
    feature_layer: int = -1,
    layout: Layout | None = None,
    xllm_queries: Literal["image", "video"] = "image",
) -> ImportReport:
    """Import a BLIP-2 / LAVIS / X-LLM Q-Former into a new image interface, written as a stage-0 checkpoint.

    Stage 1 starts from it (`init_adapter: OUT`) and trains the projection into the LLM there, at the LLM's width.

    Args:
        checkpoint: the trained Q-Former's file or transformers directory (e.g. a local `blip2-opt-2.7b`).
        encoder: the vision encoder it was trained on (transformers layout), e.g. BLIP-2's EVA-ViT-g saved alone
            (`docs/gpu_recipe.md`).
        out: the checkpoint folder to write.
        qformer: the interface's Q-Former settings, shaped like the checkpoint (default: BLIP-2's).
        feature_layer: the encoder's hidden state the Q-Former reads. BLIP-2's LayerNorm on the features is
            imported into the interface, so give the state before the encoder's own final LayerNorm: for
            EVA-ViT-g in a transformers BLIP-2 directory (39 layers), 39.
        layout: `blip2`, `lavis` or `xllm` (default: detected from the keys).
        xllm_queries: for X-LLM checkpoints, its image or its video queries.
    """
    from xllm.adapters.save import save_interface_checkpoint

    interface = ImageInterface(encoder, qformer=qformer, feature_layer=feature_layer)
    report = import_qformer_weights(interface, checkpoint, layout, xllm_queries)
    save_interface_checkpoint({"image": interface}, out, stage=0,
                              trained_on=f"imported from {checkpoint} ({report.layout} layout)")
    print(report.summary())
    print(f"stage-0 checkpoint written to {out}: start stage 1 from it with `init_adapter: {out}`")
    return report


def main() -> None:
    """`xllm-import-qformer --checkpoint ... --encoder ... --out ...` (`--help`)."""
    from jsonargparse import auto_cli

    auto_cli(import_to_checkpoint)


if __name__ == "__main__":
    main()
