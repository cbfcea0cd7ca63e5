import pytest

from xllm.data.processor import ConversationProcessor
from xllm.data.records import BadSampleError
from xllm.llm import load_tokenizer
from xllm.tensors import IGNORE_INDEX

CONVERSATION = [
    {"from": "user", "value": "<image>\nWhat colour is the shape?"},
    {"from": "assistant", "value": "It is red."},
    {"from": "user", "value": "And which shape is it?"},
    {"from": "assistant", "value": "A square."},
]


def record(conversations=CONVERSATION, rid="r1"):
    return {"id": rid, "source": "test.jsonl:1", "conversations": conversations, "media": {}}


def processor(tiny, template, llm="llama", num_tokens=4, max_length=512, **kwargs):
    tokenizer = load_tokenizer(str(tiny / llm))
    return ConversationProcessor(tokenizer, template, {"image": -200}, {"image": num_tokens}, max_length, **kwargs)


def supervised_runs(ids, labels):
    """Contiguous runs of supervised positions; labels must equal ids there."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


@pytest.mark.parametrize(
    "template,llm,expected",
    [
        ("vicuna_v1", "llama", [" It is red.</s>", " A square.</s>"]),
        ("glm4", "glm", ["\nIt is red.<|endoftext|>", "\nA square.<|endoftext|>"]),
        ("tokenizer", "llama", ["It is red.<|im_end|>\n", "A square.<|im_end|>\n"]),
    ],
)
def test_labels_cover_exactly_the_assistant_replies(tiny, template, llm, expected):
    proc = processor(tiny, template, llm)
    encoded = proc.encode(record())
    ids, labels = encoded["input_ids"], encoded["labels"]
    runs = supervised_runs(ids, labels)
    decoded = [proc.tokenizer.decode(run) for run in runs]
    assert decoded == expected
    # Everything else, the image sentinel and the user turns included, is masked.
    assert ids.count(-200) == 1 and labels[ids.index(-200)] == IGNORE_INDEX
    unsupervised = [t for t, l in zip(ids, labels) if l == IGNORE_INDEX and t >= 0]
    text = proc.tokenizer.decode(unsupervised)
    assert "What colour is the shape?" in text and "And which shape is it?" in text
    assert "red" not in text and "square" not in text


def test_prompt_for_generation_is_the_training_prefix(tiny):
    proc = processor(tiny, "vicuna_v1")
    full = proc.encode(record())["input_ids"]
    prompt = proc.encode_prompt(CONVERSATION[:1])["input_ids"]
    assert full[: len(prompt)] == prompt
    assert proc.tokenizer.decode([t for t in prompt if t >= 0]).endswith("ASSISTANT:")


def test_truncation_keeps_media_whole_and_counts_expanded_tokens(tiny):
    proc = processor(tiny, "vicuna_v1", num_tokens=10)
    full = proc.encode(record())
    length = proc.expanded_length(full["input_ids"])
    assert length == len(full["input_ids"]) - 1 + 10
    # Cutting the last reply short is fine: the first reply survives.
    proc.max_length = length - 3
    cut = proc.encode(record())
    assert cut["truncated"] and proc.expanded_length(cut["input_ids"]) <= proc.max_length
    assert cut["input_ids"] == full["input_ids"][: len(cut["input_ids"])]


def test_too_long_prompt_is_a_named_error(tiny):
    proc = processor(tiny, "vicuna_v1", num_tokens=10, max_length=20)
    with pytest.raises(BadSampleError, match=r"test.jsonl:1 \(id r1\).*max_length=20"):
        proc.encode(record())
    # A cut through the image span itself is refused too.
    proc.max_length = 40
    long_user = [{"from": "user", "value": "word " * 60 + "<image>"}, {"from": "assistant", "value": "ok"}]
    with pytest.raises(BadSampleError, match="cut a media item"):
        proc.encode(record(long_user))


def test_instruction_ids_come_from_the_interface_tokenizer_per_item(tiny):
    """Each media item gets the ids of the user turn that holds it (placeholders removed), from the
    interface's own tokenizer, in reading order: training and generation carry the same ids."""
    seen = []

    def tokenize(text):
        seen.append(text)
        return [len(seen), len(text)]

    proc = processor(tiny, "vicuna_v1", instruction_tokenizers={"image": tokenize})
    two = [{"from": "user", "value": "<image>\nWhat colour is the shape?"}, {"from": "assistant", "value": "Red."},
           {"from": "user", "value": "And here? <image>"}, {"from": "assistant", "value": "Blue."}]
    encoded = proc.encode(record(two))
    assert seen == ["What colour is the shape?", "And here?"]
    assert encoded["instruction_ids"] == {"image": [[1, 25], [2, 9]]}
    assert proc.encode_prompt(two[:3])["instruction_ids"] == {"image": [[3, 25], [4, 9]]}
    assert processor(tiny, "vicuna_v1").encode(record(two))["instruction_ids"] == {"image": []}
