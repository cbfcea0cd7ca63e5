"""Frozen encoders: a torchvision CNN by directory, and the frozen-feature cache."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import ViTImageProcessor

from xllm.encoders.vision import FrozenVisionEncoder, ImageLoader
from xllm.interfaces import ImageInterface


@pytest.fixture(scope="module")
def mobilenet_dir(tmp_path_factory):
    import torchvision

    path = tmp_path_factory.mktemp("mobilenet")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "xllm_encoder.json").write_text(json.dumps(
        {"library": "torchvision", "architecture": "mobilenet_v2", "module": "features", "hidden_size": 1280}))
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)
    return path

SMALL_QFORMER = dict(num_query_tokens=2, hidden_size=32, layers=1, heads=2, intermediate_size=32)


def test_torchvision_cnn_feature_map_becomes_tokens(mobilenet_dir):
    encoder = FrozenVisionEncoder(str(mobilenet_dir))
    assert encoder(torch.randn(2, 3, 64, 64)).shape == (2, 4, 1280)  # 2x2 map of 1280 channels
    early = FrozenVisionEncoder(str(mobilenet_dir), feature_layer=17)
    assert early.hidden_size == 160 and early(torch.randn(1, 3, 64, 64)).shape == (1, 4, 160)
    assert not any(p.requires_grad for p in early.parameters()) and not early.model.training
    with pytest.raises(ValueError, match="keep 1..19 blocks"):
        FrozenVisionEncoder(str(mobilenet_dir), feature_layer=40)
    # The tokens are the pretrained model's own feature map (its BatchNorm statistics as in the file), cell by cell
    # in row-major order, whatever memory format the encoder runs its convolutions in (channels-last, for speed).
    import torchvision
    from safetensors.torch import load_file

    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.load_state_dict(load_file(str(mobilenet_dir / "model.safetensors")))
    pixels = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feature_map = reference.eval().features[:17](pixels)  # [2, 160, 3, 3]
    scale = feature_map.abs().max()  # an untrained network's activations are tiny: compare relative to their size
    expected = feature_map.flatten(2).transpose(1, 2) / scale
    assert torch.allclose(early(pixels) / scale, expected, atol=1e-4)


def test_feature_cache_matches_the_encoder_and_positions_apply(mobilenet_dir, tiny, tmp_path):
    images = [str(tiny / "data" / "images" / f"train_0000{i}.png") for i in range(3)]
    cached = ImageInterface(str(mobilenet_dir), feature_layer=17, feature_positions=4, feature_cache=str(tmp_path),
                            qformer=SMALL_QFORMER)
    assert cached.prepare_media(images) == 3 and cached.prepare_media(images) == 0  # encoded once
    loader = cached.media_loader()
    cached_batch = cached.collate([loader(p) for p in images])
    assert set(cached_batch.values) == {"features"}  # told apart from pixels by key
    pixels_batch = cached.collate([ImageLoader(cached.processor)(p) for p in images])
    features, _ = cached.bridge_inputs(cached_batch)
    direct, _ = cached.bridge_inputs(pixels_batch)
    assert features.shape == direct.shape == (3, 4, 160)
    assert torch.allclose(features, direct, rtol=1e-5, atol=0)
    # Read once, then held in memory within the loader's byte budget (one image's features here).
    small = cached.cache.loader(memory_bytes=features[0].numel() * 4)
    first = small(images[0])["features"]
    assert small(images[0])["features"] is first and torch.equal(first, features[0])
    assert torch.equal(small(images[1])["features"], features[1]) and list(small.held) == [images[0]]
    # Cached features and pixels take the same path from there on.
    cached.attach(8)
    cached.eval()
    assert torch.allclose(cached(cached_batch).embeds, cached(pixels_batch).embeds, atol=1e-5)
    with pytest.raises(ValueError, match="feature_positions=5 but the encoder gives 4 tokens"):
        wrong = ImageInterface(str(mobilenet_dir), feature_positions=5, qformer=SMALL_QFORMER)
        wrong.attach(8)
        wrong(pixels_batch)


def test_sincos_positions_are_fixed_and_distinct():
    from xllm.blocks.positions import sincos_2d

    positions = sincos_2d(49, 160)[0]
    assert positions.shape == (49, 160)
    distances = torch.cdist(positions, positions) + torch.eye(49) * 1e9
    assert distances.min() > 0.1  # every cell has its own code
    # Row code depends only on the row: cells 0 and 1 share the first half, cells 0 and 7 the second.
    assert torch.equal(positions[0, :80], positions[1, :80]) and torch.equal(positions[0, 80:], positions[7, 80:])
    with pytest.raises(ValueError, match="square map"):
        sincos_2d(50, 160)


def test_a_fill_killed_mid_write_leaves_no_half_written_entry(mobilenet_dir, tiny, tmp_path, monkeypatch):
    """The write is cut off after some bytes (as a killed run or a full disk would): the cache holds no entry for
    that file, so the next fill encodes it again instead of serving (or crashing on) a truncated one."""
    import xllm.encoders.feature_cache as feature_cache

    images = [str(tiny / "data" / "images" / f"train_0000{i}.png") for i in range(2)]
    interface = ImageInterface(str(mobilenet_dir), feature_layer=17, feature_cache=str(tmp_path / "cache"),
                               qformer=SMALL_QFORMER)
    real_save = feature_cache.save_file

    def cut_off(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as file:
            file.truncate(40)
        raise OSError("killed mid-write")

    monkeypatch.setattr(feature_cache, "save_file", cut_off)
    with pytest.raises(OSError, match="killed mid-write"):
        interface.prepare_media(images)
    assert list((tmp_path / "cache").iterdir()) == []  # neither a truncated entry nor a partial file is left
    monkeypatch.setattr(feature_cache, "save_file", real_save)
    assert interface.prepare_media(images) == 2
    assert interface.media_loader()(images[0])["features"].shape == (4, 160)


def test_corrupt_image_with_a_feature_cache_is_named_not_fatal(mobilenet_dir, tiny, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    good = str(tiny / "data" / "images" / "train_00000.png")
    interface = ImageInterface(str(mobilenet_dir), feature_cache=str(tmp_path / "cache"), qformer=SMALL_QFORMER)
    assert interface.prepare_media([good, str(corrupt)]) == 1
    with pytest.raises(ValueError, match="cannot decode image .*corrupt.png"):
        interface.media_loader()(str(corrupt))


def test_factorised_positions_share_rows_and_columns_and_train(mobilenet_dir):
    interface = ImageInterface(str(mobilenet_dir), feature_positions=4, feature_position_kind="factorised",
                               qformer=SMALL_QFORMER)
    bridge = interface.bridge
    positions = bridge.feature_positions.table()
    assert positions.shape == (1, 4, interface.encoder.hidden_size)
    # A 2x2 map: cells 0,1 share a row, 0,2 a column, so their differences are the column/row differences.
    assert torch.allclose(positions[0, 1] - positions[0, 0], positions[0, 3] - positions[0, 2], atol=1e-6)
    assert torch.allclose(positions[0, 2] - positions[0, 0], positions[0, 3] - positions[0, 1], atol=1e-6)
    names = {n for n, p in interface.named_parameters() if p.requires_grad}
    assert {"bridge.feature_positions.rows", "bridge.feature_positions.columns"} <= names
    features = torch.zeros(1, 4, interface.encoder.hidden_size)
    assert torch.allclose(bridge.features(features), bridge.ln_features(features) + positions)
    with pytest.raises(ValueError, match="square map"):
        ImageInterface(str(mobilenet_dir), feature_positions=5, feature_position_kind="factorised",
                       qformer=SMALL_QFORMER)


def test_stage0_leaves_the_frozen_cnn_weights_and_batchnorm_statistics_as_they_were(mobilenet_dir, tiny, tmp_path):
    import pytorch_lightning as pl

    from tests.conftest import TINY_QFORMER, text_side
    from xllm.training import InterfacePretrainingModule, XLLMDataModule

    torch.manual_seed(0)
    interface = ImageInterface(str(mobilenet_dir), feature_layer=17, feature_positions=4,
                               qformer={**TINY_QFORMER, **text_side(tiny)})
    before = {name: t.clone() for name, t in interface.encoder.state_dict().items()}
    assert any("running_mean" in name for name in before)  # BatchNorm statistics: buffers, not parameters
    module = InterfacePretrainingModule(interfaces={"image": interface}, adapter_dir=str(tmp_path / "adapter"), lr=1e-2)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=XLLMDataModule(train_file=str(tiny / "data" / "train_yesno.jsonl"), batch_size=8))
    assert trainer.global_step == 3
    for name, tensor in interface.encoder.state_dict().items():
        assert torch.equal(tensor, before[name]), name
