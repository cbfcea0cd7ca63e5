"""Tiny random models and a tiny version of the demo's shapes task, for tests and the CPU smoke configs.

Everything is written as ordinary local model directories, so the configs load them through the same
`from_pretrained` paths a user's hub models take. Nothing here is downloaded. The data are the demo's
generator (`synthetic.py`) at 32 px, plus a few eSpeak clips for speech; the tokenizers are trained on their text.

    python -m xllm.demo.tiny --out .cache/tiny
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xllm.demo.synthetic import build_shapes_task

SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<pad>",
    "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>",
    "<|im_start|>", "<|im_end|>",
]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A 64-wide random LLM with the usual 0.02 init gives near-uniform logits that no input can move much;
# 0.1 makes the frozen tiny LLM responsive enough that training its inputs visibly lowers the loss.
TINY_INIT_RANGE = 0.1
TRAIN_IMAGES = 32  # 32 captions, 32 chats, 256 yes/no questions
TINY_VERSION = "7"  # bump when anything below changes, so stale caches are rebuilt


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


def build_whisper(out: Path) -> None:
    """A tiny random Whisper whose encoder window is 64 mel frames (0.64 s), so a 1-s clip spans two windows."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=32,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    WhisperModel(config).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)


SPEECH_SENTENCES = ["red circle", "blue square", "green triangle", "the red square", "a blue circle",
                    "the green star", "two red circles", "one blue star"]


def build_speech_data(out: Path) -> None:
    """`train_asr.jsonl`: the sentences above spoken by eSpeak (two voices), as 16 kHz wav files."""
    from xllm.demo.espeak import Espeak, Voice
    from xllm.demo.speech_data import TRANSCRIBE, resample, write_wav

    speaker = Espeak()
    (out / "audio").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (sentence, voice) in enumerate((s, v) for s in SPEECH_SENTENCES
                                              for v in (Voice("en-us"), Voice("en-gb-x-rp+f2", 190))):
        wave, rate = speaker.say(sentence, voice)
        name = f"audio/train_{index:03d}.wav"
        write_wav(out / name, resample(wave, rate, 16000), 16000)
        lines.append(json.dumps({"id": f"asr_{index:03d}", "audio": name, "conversations": [
            {"from": "human", "value": f"<audio>\n{TRANSCRIBE}"}, {"from": "gpt", "value": sentence}]}))
    (out / "train_asr.jsonl").write_text("\n".join(lines) + "\n")


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


TEMPLATE_WORDS = ["A chat between a curious user and an artificial intelligence assistant.", "USER: ASSISTANT:",
                  "system user assistant"]


# The files whose text trains the tiny tokenizers: the same set since the tiny models were first built, so the files
# added since (open questions, descriptions) leave the tiny models, and the fixtures made with them, as they are.
CORPUS_FILES = ("train_asr.jsonl", "train_captions.jsonl", "train_chat.jsonl", "train_scenes.jsonl",
                "train_yesno.jsonl")


def corpus_for_tokenizer(data: Path) -> list[str]:
    """Every text of the generated training files (`CORPUS_FILES`), plus the templates' own words."""
    texts = list(TEMPLATE_WORDS)
    for path in sorted(data / name for name in CORPUS_FILES):
        for line in path.read_text().splitlines():
            texts += [turn["value"].replace("<image>", "").replace("<audio>", "")
                      for turn in json.loads(line).get("conversations", [])]  # scene lists have none
    return texts


def build_all(out: str | Path = ".cache/tiny", force: bool = False) -> Path:
    """Write tokenizer/, llama/, glm/, vit/, bert/, whisper/ and data/ under `out` (skips when already complete)."""
    out = Path(out)
    stamp = out / "COMPLETE"
    if stamp.exists() and stamp.read_text().strip() == TINY_VERSION and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.manual_seed(0)
    build_shapes_task(out / "data", train=TRAIN_IMAGES, val=4, test=6, seed=0, image_size=32)
    build_speech_data(out / "data")
    corpus = corpus_for_tokenizer(out / "data")
    tokenizer = build_tokenizer(out / "tokenizer", corpus)
    build_llama(out / "llama", tokenizer)
    build_glm(out / "glm", tokenizer)
    build_vit(out / "vit")
    build_bert(out / "bert", corpus)
    build_whisper(out / "whisper")
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
