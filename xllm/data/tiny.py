"""Tiny random models and a tiny generated image data set, for tests and the CPU smoke configs.

Everything is written as ordinary local model directories, so the configs load them through the same
`from_pretrained` paths a user's hub models take. Nothing here is downloaded.

    python -m xllm.data.tiny --out .cache/tiny
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<pad>",
    "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>",
    "<|im_start|>", "<|im_end|>",
]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
# A 64-wide random LLM with the usual 0.02 init gives near-uniform logits that no input can move much;
# 0.1 makes the frozen tiny LLM responsive enough that training its inputs visibly lowers the loss.
TINY_INIT_RANGE = 0.1
TINY_VERSION = "3"  # bump when anything below changes, so stale caches are rebuilt


def build_tokenizer(out: Path, corpus: list[str]):
    """A byte-level BPE trained on `corpus` in well under a second, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_llama(out: Path, tokenizer) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=TINY_INIT_RANGE,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_glm(out: Path, tokenizer) -> None:
    from transformers import GlmConfig, GlmForCausalLM

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GlmConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        initializer_range=TINY_INIT_RANGE,
        bos_token_id=None, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )
    GlmForCausalLM(config).save_pretrained(out)
    glm_tokenizer = tokenizer.__class__.from_pretrained(out.parent / "tokenizer")
    glm_tokenizer.eos_token = "<|endoftext|>"
    glm_tokenizer.bos_token = None
    glm_tokenizer.save_pretrained(out)


def build_vit(out: Path) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
    )
    ViTModel(config).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)


def build_bert(out: Path, corpus: list[str]) -> None:
    """A tiny BERT with its own WordPiece tokenizer ([CLS] ... [SEP]), like a real BERT checkpoint."""
    from tokenizers import BertWordPieceTokenizer, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(corpus, vocab_size=300, min_frequency=1)
    backend = wordpiece._tokenizer  # the tokenizers.Tokenizer inside the convenience wrapper
    backend.post_processor = processors.BertProcessing(
        ("[SEP]", backend.token_to_id("[SEP]")), ("[CLS]", backend.token_to_id("[CLS]"))
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(out)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out)


def draw_shape(colour: str, shape: str, size: int = 32, seed: int = 0):
    """A `size`×`size` RGB image of one coloured shape on a grey background, jittered by `seed`."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    half = rng.randint(7, 11)
    cx, cy = rng.randint(half, size - half - 1), rng.randint(half, size - half - 1)
    box = (cx - half, cy - half, cx + half, cy + half)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def build_shapes_data(out: Path, per_class: dict[str, int], seed: int = 0) -> None:
    """Images of one coloured shape; JSONL files per split: captions (stage 1), chats (stage 2), yes/no (test)."""
    rng = random.Random(seed)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for split, count in per_class.items():
        captions, chats, questions = [], [], []
        index = 0
        for colour in COLOURS:
            for shape in SHAPES:
                for _ in range(count):
                    name = f"images/{split}_{index:04d}.png"
                    draw_shape(colour, shape, seed=rng.randrange(1 << 30)).save(out / name)
                    record_id = f"{split}-{index}"
                    captions.append({"id": record_id, "image": name, "conversations": [
                        {"from": "human", "value": "<image>\nDescribe the image."},
                        {"from": "gpt", "value": f"A {colour} {shape}."}]})
                    chats.append({"id": record_id, "image": name, "conversations": [
                        {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                        {"from": "gpt", "value": f"It is {colour}."},
                        {"from": "human", "value": "And which shape is it?"},
                        {"from": "gpt", "value": f"A {shape}."}]})
                    other = rng.choice([c for c in COLOURS if c != colour])
                    for asked, answer in ((colour, "Yes"), (other, "No")):
                        questions.append({"id": f"{record_id}-{asked}", "image": name, "conversations": [
                            {"from": "human", "value": f"<image>\nIs the shape {asked}? Answer yes or no."},
                            {"from": "gpt", "value": answer}]})
                    index += 1
        for stem, rows in (("captions", captions), ("chat", chats), ("yesno", questions)):
            with open(out / f"{split}_{stem}.jsonl", "w") as handle:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")


def corpus_for_tokenizer() -> list[str]:
    words = list(COLOURS) + list(SHAPES) + ["Describe the image.", "What colour is the shape?", "It is",
                                            "And which shape is it?", "Is the shape", "Answer yes or no.", "Yes", "No",
                                            "A chat between a curious user and an artificial intelligence assistant.",
                                            "USER: ASSISTANT:", "system user assistant"]
    return [" ".join(words)] * 20 + words


def build_all(out: str | Path = ".cache/tiny", force: bool = False) -> Path:
    """Write tokenizer/, llama/, glm/, vit/, bert/ and data/ under `out` (skips when already complete)."""
    out = Path(out)
    stamp = out / "COMPLETE"
    if stamp.exists() and stamp.read_text().strip() == TINY_VERSION and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.manual_seed(0)
    tokenizer = build_tokenizer(out / "tokenizer", corpus_for_tokenizer())
    build_llama(out / "llama", tokenizer)
    build_glm(out / "glm", tokenizer)
    build_vit(out / "vit")
    build_bert(out / "bert", corpus_for_tokenizer())
    build_shapes_data(out / "data", {"train": 12, "val": 2, "test": 3})
    stamp.write_text(TINY_VERSION + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".cache/tiny", help="folder to write the tiny models and data into")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    args = parser.parse_args()
    print(f"tiny models and data in {build_all(args.out, args.force)}")


if __name__ == "__main__":
    main()
