import sys

import pytest
import torch

from beit_lightning.tokenizers import DallETokenizer, map_pixels, unmap_pixels
from conftest import TESTS

STAND_IN = str(TESTS / "openai_dall_e")


def _save_openai(path, kind="encoder", **kwargs):
    """Save a random-weight encoder (or decoder) the way OpenAI's encoder.pkl was saved (torch.save of
    the module), with our stand-in of the dall_e package; return the module (the reference)."""
    sys.path.insert(0, STAND_IN)
    try:
        import importlib

        module = getattr(importlib.import_module(f"dall_e.{kind}"), kind.capitalize())(**kwargs)
        torch.save(module, path)
    finally:
        sys.path.remove(STAND_IN)
        for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
            del sys.modules[name]
    return module


def _save_openai_encoder(path, **kwargs):
    return _save_openai(path, "encoder", **kwargs)


def test_openai_encoder_round_trip_gives_the_reference_tokens(tmp_path):
    path = tmp_path / "encoder.pkl"
    reference = _save_openai_encoder(path, n_hid=64, n_blk_per_group=1, vocab_size=512)
    assert "dall_e" not in sys.modules
    tokenizer = DallETokenizer.from_openai(path)  # 112px -> 14x14, like BEiT
    assert "dall_e" not in sys.modules, "loading must not import the dall_e package"
    assert (tokenizer.vocab_size, tokenizer.image_size, tokenizer.grid_size) == (512, 112, (14, 14))
    images = torch.rand(2, 3, 112, 112)
    tokens = tokenizer.encode(images)
    assert tokens.shape == (2, 14, 14) and tokens.dtype == torch.long
    with torch.no_grad():
        expected_logits = reference(map_pixels(images))
    torch.testing.assert_close(tokenizer.encode_logits(images), expected_logits)
    assert torch.equal(tokens, expected_logits.argmax(1))
    assert len(tokens.unique()) > 1


def test_default_size_matches_openai_layout(tmp_path):
    path = tmp_path / "encoder.pkl"
    reference = _save_openai_encoder(path)  # n_hid 256, 2 blocks per group, 8192 codes
    tokenizer = DallETokenizer.from_openai(path)
    assert set(tokenizer.encoder.state_dict()) == set(reference.state_dict())
    assert sum(p.numel() for p in tokenizer.parameters()) == sum(p.numel() for p in reference.parameters())
    assert tokenizer.vocab_size == 8192


def test_refuses_arbitrary_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "encoder.pkl"
    torch.save({"encoder": Exploit()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        DallETokenizer.from_openai(path)
    assert not marker.exists()


def test_refuses_other_modules_and_missing_files(tmp_path):
    path = tmp_path / "other.pkl"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="torch.nn.modules.linear.Linear"):
        DallETokenizer.from_openai(path)
    with pytest.raises(FileNotFoundError, match="encoder.pkl"):
        DallETokenizer.from_openai(tmp_path / "missing.pkl")
    enc = tmp_path / "encoder.pkl"
    _save_openai_encoder(enc, n_hid=64, n_blk_per_group=1, vocab_size=512)
    with pytest.raises(ValueError, match="512 codes"):
        DallETokenizer.from_openai(enc, vocab_size=8192)


def test_map_pixels():
    x = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(map_pixels(x), torch.tensor([0.1, 0.5, 0.9]))
    torch.testing.assert_close(unmap_pixels(map_pixels(x)), x)


def test_encode_ignores_autocast_and_checks_size():
    tokenizer = DallETokenizer(n_hid=16, n_blk_per_group=1, vocab_size=64, image_size=32, seed=0)
    images = torch.rand(2, 3, 32, 32)
    expected = tokenizer.encode(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tokenizer.encode(images), expected)
    with pytest.raises(ValueError, match="tokenizer view size to 32"):
        tokenizer.encode(torch.rand(2, 3, 64, 64))
    # a seeded untrained tokenizer is reproducible
    again = DallETokenizer(n_hid=16, n_blk_per_group=1, vocab_size=64, image_size=32, seed=0)
    assert torch.equal(again.encode(images), expected)


def _save_openai_decoder(path, **kwargs):
    return _save_openai(path, "decoder", **kwargs)


def test_openai_decoder_decodes_tokens_as_openai_does(tmp_path):
    """decoder.pkl (for pictures decoded from tokens): loaded without the dall_e package, and
    decode(tokens) = unmap_pixels(sigmoid(decoder(one_hot(tokens))[:, :3])), OpenAI's usage."""
    _save_openai_encoder(tmp_path / "encoder.pkl", n_hid=32, n_blk_per_group=1, vocab_size=64)
    reference = _save_openai_decoder(tmp_path / "decoder.pkl", n_init=16, n_hid=8, n_blk_per_group=1, vocab_size=64)
    assert not DallETokenizer.from_openai(tmp_path / "encoder.pkl", image_size=32).can_decode
    tokenizer = DallETokenizer.from_openai(tmp_path / "encoder.pkl", image_size=32, decoder_path=tmp_path / "decoder.pkl")
    assert tokenizer.can_decode and "dall_e" not in sys.modules
    tokens = torch.randint(0, 64, (2, 4, 4))
    with torch.no_grad():
        stats = reference(torch.nn.functional.one_hot(tokens, 64).permute(0, 3, 1, 2).float())
    expected = unmap_pixels(torch.sigmoid(stats[:, :3]))
    images = tokenizer.decode(tokens)
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, expected)
    with pytest.raises(ValueError, match="decoder.pkl published with encoder.pkl"):
        _save_openai_decoder(tmp_path / "other.pkl", n_init=16, n_hid=8, n_blk_per_group=1, vocab_size=32)
        DallETokenizer.from_openai(tmp_path / "encoder.pkl", image_size=32, decoder_path=tmp_path / "other.pkl")
    with pytest.raises(ValueError, match="not an OpenAI DALL-E decoder.pkl.*dall_e.encoder.Encoder"):
        DallETokenizer.from_openai(tmp_path / "encoder.pkl", image_size=32, decoder_path=tmp_path / "encoder.pkl")
