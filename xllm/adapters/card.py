"""An adapter's model card (`README.md`, Hugging Face Hub layout): what it is, what it was trained against, its
numbers, and how to load it with an example in the adapter's own modalities."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xllm.adapters.format import CARD_NAME, CONFIG_NAME
from xllm.extras import DISTRIBUTION
from xllm.interfaces.base import placeholder

# The card's "Load" example per modality: a question and a file name (other modalities get a generic one).
EXAMPLES = {
    "image": ("What is in the picture?", "photo.jpg"),
    "video": ("What happens in the clip?", "clip.mp4"),
    "audio": ("Transcribe the audio.", "speech.wav"),
}


def load_example(modalities: list[str]) -> list[str]:
    """Python lines that load the adapter and ask about one item of each of its modalities."""
    placeholders = "".join(placeholder(m) + "\\n" for m in modalities)
    question = EXAMPLES.get(modalities[0], ("Describe it.", ""))[0]
    media = ", ".join(f'"{m}": "{EXAMPLES.get(m, ("", f"my.{m}"))[1]}"' for m in modalities)
    return ["from xllm import XLLM", "",
            "model = XLLM.from_pretrained(\"path/to/this/folder\")  # llm=..., encoders={...} if models moved",
            f'print(model.chat([{{"from": "user", "value": "{placeholders}{question}"}}], {{{media}}}))']


def write_model_card(directory: str | Path, metrics: Mapping[str, Any] | None = None) -> Path:
    """(Re)write the directory's `README.md`: what it is, what it was trained against, its numbers, how to load it."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    llm = config.get("llm") or {}
    modalities = sorted(config["interfaces"])
    lines = ["---", "library_name: xllm", "tags:", "- xllm", *[f"- {m}" for m in modalities],
             "- multimodal", "---", "", f"# xllm {'adapter' if llm else 'interface checkpoint'} "
             f"(stage {config.get('stage')})", ""]
    if llm:
        lines += [f"Foreign-language interfaces ({', '.join(modalities)}) for the frozen LLM `{llm.get('path')}` "
                  f"(hidden size {llm.get('hidden_size')}, template `{config.get('template')}`"
                  f"{', LoRA' if config.get('lora') else ''}).", ""]
    else:
        lines += [f"LLM-free stage-0 pretraining of the {', '.join(modalities)} interface; train stage 1 from it "
                  "with `init_adapter:`.", ""]
    lines += ["| interface | class | frozen encoder | encoder width |", "|---|---|---|---:|"]
    for name, spec in config["interfaces"].items():
        lines.append(f"| {name} | `{spec['class_path']}` | `{spec['init_args'].get('encoder')}` | "
                     f"{spec.get('encoder_hidden_size')} |")
    if config.get("extras"):
        names = ",".join(config["extras"])
        lines += ["", f"Needs the `{names}` extra of xllm: `pip install '{DISTRIBUTION}[{names}]'`."]
    if config.get("trained_on"):
        lines += ["", f"Trained on: {config['trained_on']}."]
    if metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## Load", "", "```python", *load_example(modalities), "```", "",
              "Paths in `config.json` listed under `local_paths` are relative to this folder. Only the trained "
              "tensors are in `adapter.safetensors`; the frozen LLM and encoders are loaded from their paths.", ""]
    path = directory / CARD_NAME
    path.write_text("\n".join(lines))
    return path
