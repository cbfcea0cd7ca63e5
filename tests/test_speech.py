"""Speech: audio decoding (formats, channels, rates), bad input, the own-length Whisper encoder, a tiny fit."""

import wave
from pathlib import Path

import av
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from xllm.data.dataset import ConversationDataset, build_tokenized_dataset
from xllm.data.records import BadSampleError, BadSamples
from xllm.encoders.audio import decode_audio
from xllm.encoders.whisper import FrozenSpeechEncoder
from xllm.interfaces import SpeechInterface
from xllm.model import XLLM

TINY_CFORMER = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_tokens=64, dropout=0.0)


def tone(seconds: float, rate: int, hz: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def write_audio(path: Path, channels: list[np.ndarray], rate: int, codec: str = "pcm_s16le",
                video: bool = False) -> Path:
    """Encode channels with PyAV (`video=True` adds a short video stream first, as in an mp4 with sound)."""
    layout = "mono" if len(channels) == 1 else "stereo"
    with av.open(str(path), "w") as container:
        picture = container.add_stream("mpeg4", rate=10) if video else None  # every stream before any packet
        stream = container.add_stream(codec, rate=rate, layout=layout)
        if picture is not None:
            picture.width, picture.height, picture.pix_fmt = 32, 32, "yuv420p"
            for _ in range(3):
                frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
                container.mux(picture.encode(frame))
            container.mux(picture.encode(None))
        samples = np.stack(channels).astype(np.float32)
        fmt = stream.codec_context.codec.audio_formats[0].name
        scale = {"s16": (32767, np.int16), "s32": (2**31 - 1, np.int32)}.get(fmt.rstrip("p"), (1, np.float32))
        data = (np.clip(samples, -1, 1) * scale[0]).astype(scale[1])
        data = data.T.reshape(1, -1) if not fmt.endswith("p") else data
        frame_size = stream.codec_context.frame_size or max(1, data.shape[-1])
        step = frame_size * (1 if fmt.endswith("p") else len(channels))
        for start in range(0, data.shape[-1], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, start:start + step]), format=fmt,
                                               layout=layout)
            frame.rate = rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("rate,channels", [(44100, 2), (48000, 1), (8000, 1), (16000, 2)])
def test_a_known_tone_keeps_its_pitch_and_duration_when_resampled(tmp_path, rate, channels):
    path = write_audio(tmp_path / "tone.wav", [tone(1.0, rate)] * channels, rate)
    wave = decode_audio(str(path), 16000)
    assert abs(len(wave) - 16000) <= 64
    assert abs(peak_hz(wave, 16000) - 440.0) <= 2.0
    assert 0.45 <= np.abs(wave[1000:-1000]).max() <= 0.55  # amplitude kept (stereo averaged, not summed)


def test_stereo_is_averaged_not_channel_zero(tmp_path):
    left, right = tone(1.0, 16000, 440), tone(1.0, 16000, 1000)
    wave = decode_audio(str(write_audio(tmp_path / "two.wav", [left, right], 16000)), 16000)
    spectrum = np.abs(np.fft.rfft(wave))
    freqs = np.fft.rfftfreq(len(wave), 1 / 16000)
    at = lambda hz: spectrum[np.abs(freqs - hz).argmin()]  # noqa: E731
    assert at(1000) > 0.8 * at(440)  # both channels are there (SALMONN-style channel 0 would lose 1000 Hz)


@pytest.mark.parametrize("name,codec,video", [
    ("a.flac", "flac", False), ("a.mp3", "mp3", False), ("a.ogg", "libopus", False), ("a.m4a", "aac", False),
    ("a.mp4", "aac", True),
])
def test_common_formats_decode(tmp_path, name, codec, video):
    rate = 48000 if codec == "libopus" else 44100
    path = write_audio(tmp_path / name, [tone(1.0, rate)], rate, codec=codec, video=video)
    wave = decode_audio(str(path), 16000)
    assert abs(len(wave) / 16000 - 1.0) < 0.1 and abs(peak_hz(wave, 16000) - 440.0) <= 3.0


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words its error must contain)."""
    good = write_audio(tmp_path / "good.wav", [tone(2.0, 16000)], 16000)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    flac = write_audio(tmp_path / "good.flac", [tone(2.0, 16000)], 16000, codec="flac")
    truncated_flac = tmp_path / "truncated.flac"
    truncated_flac.write_bytes(flac.read_bytes()[: len(flac.read_bytes()) // 3])
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio\n" * 20)
    silent = write_audio(tmp_path / "silent.wav", [np.zeros(16000, np.float32)], 16000)
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as header_only:
        header_only.setnchannels(1), header_only.setsampwidth(2), header_only.setframerate(16000)
    video_only = tmp_path / "video_only.mp4"
    with av.open(str(video_only), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(5):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    return {"truncated": (truncated, "truncated"), "truncated_flac": (truncated_flac, "truncated"), "not_audio": (not_audio, "cannot open audio"),
            "silent": (silent, "silent"), "empty": (empty, "zero-length"),
            "video_only": (video_only, "no audio track")}


def test_bad_audio_raises_naming_the_file(tmp_path):
    for name, (path, words) in bad_files(tmp_path).items():
        with pytest.raises(ValueError, match=words) as caught:
            decode_audio(str(path), 16000)
        assert str(path) in str(caught.value), name


def speech_interface(tiny: Path, **overrides) -> SpeechInterface:
    torch.manual_seed(0)
    return SpeechInterface(str(tiny / "whisper"), **{**TINY_CFORMER, **overrides})


def test_bad_audio_in_a_data_file_names_the_record_or_is_counted(tiny, tmp_path):
    files = bad_files(tmp_path)
    lines = [f'{{"id": "{name}", "audio": "{path.name}", "conversations": [{{"from": "human", "value": '
             f'"<audio>\\nTranscribe the audio."}}, {{"from": "gpt", "value": "a tone"}}]}}' for name, (path, _) in files.items()]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    model = XLLM.from_paths(str(tiny / "llama"), {"audio": speech_interface(tiny)}, template="vicuna_v1")
    rows = build_tokenized_dataset(str(data), model.processor(max_length=256).text)
    loaders = {"audio": model.interfaces["audio"].media_loader()}
    for index, (name, (_, words)) in enumerate(files.items()):
        with pytest.raises(BadSampleError, match=words) as caught:
            ConversationDataset(rows, loaders)[index]
        assert f"(id {name})" in str(caught.value)
    skipping = BadSamples("skip")
    dataset = ConversationDataset(rows, loaders, skipping)
    assert all("skipped" in dataset[i] for i in range(len(files)))
    assert skipping.counts["corrupt_media"] == len(files)


def test_own_length_encoder_equals_the_stock_forward_on_a_full_window(tiny):
    encoder = FrozenSpeechEncoder(str(tiny / "whisper"))
    mel = torch.randn(2, encoder.window, 80)
    ours, lengths = encoder(mel)
    stock = encoder.model(mel.transpose(1, 2)).last_hidden_state
    assert lengths.tolist() == [encoder.window // 2] * 2
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def test_encoder_batch_equals_one_by_one_and_long_clips_are_chunked_not_cut(tiny):
    encoder = FrozenSpeechEncoder(str(tiny / "whisper"))
    window = encoder.window  # 64 mel frames in the tiny Whisper
    lengths = [31, 2 * window + 21, window]  # odd lengths: the stride-2 convolution reads one frame past the end
    batch = torch.zeros(3, max(lengths), 80)
    items = [torch.randn(n, 80) for n in lengths]
    for row, item in enumerate(items):
        batch[row, : len(item)] = item
    together, out_lengths = encoder(batch, torch.tensor(lengths))
    assert out_lengths.tolist() == [16, window + 11, window // 2]  # ceil(n / 2) per window, all windows kept
    for row, item in enumerate(items):
        alone, _ = encoder(item[None])
        torch.testing.assert_close(together[row, : out_lengths[row]], alone[0], atol=1e-5, rtol=1e-4)


def test_short_clip_features_match_the_30_second_padded_run(tmp_path):
    """Real Whisper tiny.en weights (from the demo's model package): how close the own-length run is to Whisper's
    padded one. Measured on this eSpeak clip: mean cosine 0.95; the bound leaves room."""
    from xllm.demo.espeak import Espeak, Voice
    from xllm.demo.materialize import materialize_whisper_tiny_en
    from xllm.demo.speech_data import resample

    path = materialize_whisper_tiny_en(tmp_path / "whisper-tiny-en")
    wave, rate = Espeak().say("the red circle is left of the blue square", Voice("en-us"))
    short, padded = FrozenSpeechEncoder(str(path)), FrozenSpeechEncoder(str(path), pad_to_window=True)
    mel = short.mel(resample(wave, rate, 16000))[None]
    own, own_lengths = short(mel)
    reference, reference_lengths = padded(mel)
    assert own_lengths.tolist() == reference_lengths.tolist()
    cosine = torch.nn.functional.cosine_similarity(own[0], reference[0], dim=-1)
    assert float(cosine.mean()) > 0.9 and float(cosine.quantile(0.1)) > 0.8, (cosine.mean(), cosine.min())


@pytest.mark.slow
def test_tiny_speech_fit_stage0_then_stage1_then_chat(tiny, tmp_path):
    from xllm.objectives import CIFObjective
    from xllm.training import InterfacePretrainingModule, XLLMDataModule, XLLMModule

    def fit(module, steps):
        data = XLLMDataModule(train_file=str(tiny / "data" / "train_asr.jsonl"), batch_size=8)
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
        trainer.fit(module, datamodule=data)
        return trainer

    stage0 = InterfacePretrainingModule({"audio": speech_interface(tiny)}, CIFObjective(str(tiny / "llama")),
                                        lr=1e-2, adapter_dir=str(tmp_path / "stage0"))
    objective = stage0.objective
    batch = stage0.collator()([stage0.build_dataset(str(tiny / "data" / "train_asr.jsonl"), None, BadSamples())[i]
                               for i in range(8)])
    before = objective(stage0.interface, batch)
    fit(stage0, 30)
    stage0.eval()
    after = objective(stage0.interface, batch)
    # Measured: loss 43.8 -> 7.8 (the pull toward the typed tokens' embeddings 35.4 -> 1.4, quantity 2.4 -> 0.4).
    assert float(after.loss) < 0.5 * float(before.loss), (before, after)
    assert float(after.metrics["embedding_distance"]) < 0.5 * float(before.metrics["embedding_distance"]), (before, after)
    assert float(after.metrics["quantity"]) < float(before.metrics["quantity"]), (before.metrics, after.metrics)
    assert (tmp_path / "stage0" / "adapter.safetensors").is_file()

    stage1 = XLLMModule(llm=str(tiny / "llama"), interfaces={"audio": speech_interface(tiny)}, stage=1,
                        template="vicuna_v1", init_adapter=str(tmp_path / "stage0"), adapter_dir=str(tmp_path / "stage1"),
                        lr=1e-3, max_length=256)
    loaded = dict(stage1.model.interfaces["audio"].named_parameters())
    torch.testing.assert_close(loaded["bridge.alpha_out.weight"], stage0.interface.bridge.alpha_out.weight)
    fit(stage1, 4)
    from xllm.model import XLLM

    model = XLLM.from_pretrained(tmp_path / "stage1")
    reply = model.chat([{"from": "user", "value": "<audio>\nTranscribe the audio."}],
                       {"audio": str(tiny / "data" / "audio" / "train_000.wav")}, max_new_tokens=5)
    assert isinstance(reply, str)


def test_image_and_audio_in_one_conversation_and_the_window_qformer(tiny):
    from tests.conftest import make_image_interface

    torch.manual_seed(0)
    model = XLLM.from_paths(str(tiny / "llama"), {"image": make_image_interface(tiny),
                                                 "audio": speech_interface(tiny, bridge="window", window_frames=4)},
                            template="vicuna_v1")
    image = next((tiny / "data" / "images").glob("*.png"))
    clips = sorted((tiny / "data" / "audio").glob("*.wav"))[:2]
    batch = model.processor()([[{"from": "user", "value": "<image>\n<audio>\nDoes the speech describe the picture?"}],
                         [{"from": "user", "value": "<audio>\nTranscribe the audio."}]],
                        [{"image": [str(image)], "audio": [str(clips[0])]}, {"audio": [str(clips[1])]}])
    tokens = model.interfaces["audio"](batch["media"]["audio"])
    frames = [len(model.interfaces["audio"].load_media(str(c))["mel"]) for c in clips]
    # one token per window of 4 encoder frames (2 mel frames each), per clip: counts follow duration
    assert tokens.lengths.tolist() == [-(-((n + 1) // 2) // 4) for n in frames]
    reply = model.chat([{"from": "user", "value": "<image>\n<audio>\nWhat do you hear?"}],
                       {"image": str(image), "audio": str(clips[0])}, max_new_tokens=3)
    assert isinstance(reply, str)


def test_cif_objective_refuses_a_window_qformer_with_a_reason(tiny):
    from xllm.objectives import CIFObjective

    with pytest.raises(ValueError, match="window Q-Former has no token alignment"):
        CIFObjective(str(tiny / "llama")).bind(speech_interface(tiny, bridge="window"))
