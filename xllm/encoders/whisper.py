"""The frozen Whisper speech encoder, run on each clip's own length, and its log-mel features."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from xllm.frozen import check_model_path, freeze, resolve_dtype
from xllm.tensors import pad_stack


def log_mel(feature_extractor, waveform) -> torch.Tensor:
    """`[frames, mel_bins]` Whisper log-mel features of one mono waveform at the extractor's rate, on its own
    length (the extractor would pad to 30 s by default)."""
    features = feature_extractor(waveform, sampling_rate=feature_extractor.sampling_rate, return_tensors="pt",
                                 padding="longest", truncation=False)["input_features"][0]
    return features.transpose(0, 1).contiguous()


class FrozenSpeechEncoder(nn.Module):
    """A frozen Whisper encoder run on each clip's own length: `forward(mel, mel_lengths) -> (features, lengths)`.

    transformers' `WhisperEncoder` refuses mel inputs other than 3000 frames (30 s), and its maintainers keep it
    so (transformers #25744, #26241, PR #27369); padding a 2-second clip to 30 s costs ~15x the compute. This
    class runs the encoder's own modules on the clip's frames with the position table sliced to that length,
    zeroing the convolution outputs and masking attention beyond each clip, so a clip gives the same features
    alone as in a padded batch. `pad_to_window=True` runs the stock forward on 30-s windows instead (the
    reference the short path is tested against). A clip longer than the window is cut into consecutive
    windows, each encoded on its own (positions restart), and their features are concatenated: nothing is
    dropped.

    mel: `[batch, frames, mel_bins]` log-mel features (100 frames/s), zero-padded beyond `mel_lengths`.
    Returns features `[batch, ceil(frames / 2), hidden]` (50 frames/s) and their lengths.
    """

    def __init__(self, path: str, dtype: str = "float32", pad_to_window: bool = False) -> None:
        super().__init__()
        from transformers import AutoFeatureExtractor

        check_model_path(path, "speech encoder")
        config = AutoConfig.from_pretrained(path)
        if config.model_type != "whisper":
            raise ValueError(f"{path}: the speech encoder must be a Whisper checkpoint, got model_type "
                             f"{config.model_type!r}")
        model = AutoModel.from_pretrained(path, dtype=resolve_dtype(dtype))
        self.model = freeze(model.get_encoder())  # the decoder is never used
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(path)
        self.sample_rate: int = self.feature_extractor.sampling_rate
        self.hidden_size: int = config.d_model
        self.pad_to_window = pad_to_window
        # Mel frames per encoder window (3000 = 30 s): max_source_positions after the stride-2 convolution.
        self.window = config.max_source_positions * self.model.conv1.stride[0] * self.model.conv2.stride[0]

    def mel(self, waveform) -> torch.Tensor:
        """`[frames, mel_bins]` log-mel features of one mono waveform at `sample_rate`, on its own length."""
        return log_mel(self.feature_extractor, waveform)

    @torch.no_grad()
    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, frames = mel.shape[:2]
        if mel_lengths is None:
            mel_lengths = torch.full((batch,), frames, dtype=torch.long)
        # Every item becomes one row per window; rows are encoded together and concatenated back per item.
        rows, owners = [], []
        for item, length in enumerate(mel_lengths.tolist()):
            for start in range(0, length, self.window):
                rows.append(mel[item, start:min(length, start + self.window)])
                owners.append(item)
        row_features, row_lengths = self._encode_rows(rows)
        per_item: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        for owner, features, length in zip(owners, row_features, row_lengths.tolist()):
            per_item[owner].append(features[:length])
        items = [torch.cat(parts) for parts in per_item]
        return pad_stack(items)[0], torch.tensor([len(t) for t in items], dtype=torch.long)

    def _encode_rows(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.model
        dtype, device = encoder.conv1.weight.dtype, encoder.conv1.weight.device
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
        out_lengths = (lengths + 1) // 2  # the stride-2 convolution
        if self.pad_to_window:
            mel = rows[0].new_zeros((len(rows), self.window, rows[0].shape[1]))
            for i, row in enumerate(rows):
                # Whisper's log-mel is clamped at (its max - 8) and scaled by 1/4: silence padded after a clip
                # is exactly the clip's maximum - 2.
                mel[i] = row.max() - 2.0
                mel[i, : len(row)] = row
            hidden = encoder(mel.transpose(1, 2).to(device, dtype)).last_hidden_state
            return hidden, out_lengths
        mel = pad_stack(rows)[0].to(device, dtype).transpose(1, 2)  # [rows, bins, frames], zero-padded
        frames = mel.shape[2]
        valid = torch.arange(frames, device=device)[None] < lengths[:, None]
        hidden = nn.functional.gelu(encoder.conv1(mel)) * valid[:, None].to(dtype)  # as an own-length run's padding
        hidden = nn.functional.gelu(encoder.conv2(hidden)).transpose(1, 2)
        steps = hidden.shape[1]
        hidden = hidden + encoder.embed_positions.weight[:steps]
        keys_valid = torch.arange(steps, device=device)[None] < out_lengths[:, None]
        mask = torch.zeros((len(rows), 1, steps, steps), dtype=dtype, device=device)
        mask = mask.masked_fill(~keys_valid[:, None, None, :], torch.finfo(dtype).min)
        for layer in encoder.layers:
            hidden = layer(hidden, mask)
        return encoder.layer_norm(hidden), out_lengths
