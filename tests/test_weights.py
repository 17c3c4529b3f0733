"""Weights by name, URL or file (beit_lightning.weights): the cache and its downloads against a local
HTTP server, the Hugging Face Hub and timm sources against a local Hub cache, every registry entry's
format and model config on stand-ins of the official layouts, and the refusal of pickles that run code.
No test reaches the internet: the server listens on 127.0.0.1 and the Hub is offline."""

from __future__ import annotations

import hashlib
import http.server
import importlib
import os
import sys
import threading
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from beit_lightning.checkpoints import load_checkpoint
from beit_lightning.cli import ConfigError, train
from beit_lightning.models import BeitForMaskedImageModeling
from beit_lightning.tokenizers import DallETokenizer, load_tokenizer
from beit_lightning.weights import (
    REGISTRY,
    HashMismatchError,
    UnsafeWeightsError,
    WeightsEntry,
    WeightsUnavailableError,
    download_url,
    get_entry,
    list_entries,
    resolve_weights,
    url_cache_path,
)
from beit_lightning.weights.cli import weights_main
from conftest import TESTS

DALL_E_STAND_IN = str(TESTS / "openai_dall_e")


# --- a local HTTP server ------------------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requests.append(self.path)
        if self.path.startswith("/broken/"):  # announces 1000 bytes, sends 100, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 100)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """``(base URL, folder it serves, list of requested paths)``; downloads allowed, cache in tmp_path."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache of our own, with downloads allowed (the suite forbids them elsewhere)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("BEIT_LIGHTNING_CACHE", str(root))
    monkeypatch.delenv("BEIT_LIGHTNING_OFFLINE", raising=False)
    return root


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty cache of this test's own, downloads still forbidden: what a test puts there (or finds
    missing) does not depend on which tests ran before it in the session's shared cache."""
    root = tmp_path / "offline_cache"
    monkeypatch.setenv("BEIT_LIGHTNING_CACHE", str(root))
    monkeypatch.setenv("BEIT_LIGHTNING_OFFLINE", "1")
    return root


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_a_url_is_downloaded_once_into_the_cache(server, cache):
    base, folder, requests = server
    payload = os.urandom(3 * (1 << 20) + 17)  # more than one chunk
    (folder / "weights.pth").write_bytes(payload)
    url = f"{base}/weights.pth"
    path = resolve_weights(url)
    assert path == url_cache_path(url) and path.startswith(str(cache))
    assert Path(path).read_bytes() == payload
    assert resolve_weights(url) == path and requests == ["/weights.pth"], "a cache hit makes no request"
    # a known hash is checked: the right one keeps the file
    other = f"{base}/other.pth"
    (folder / "other.pth").write_bytes(payload[:1000])
    assert Path(download_url(other, sha256=hashlib.sha256(payload[:1000]).hexdigest())).read_bytes() == payload[:1000]


def test_a_hash_mismatch_is_refused_and_nothing_is_kept(server, cache):
    base, folder, _ = server
    (folder / "w.pth").write_bytes(b"not the published file")
    got = hashlib.sha256(b"not the published file").hexdigest()
    with pytest.raises(HashMismatchError) as err:
        download_url(f"{base}/w.pth", sha256="ab" * 32)
    assert got in str(err.value) and "ab" * 32 in str(err.value)
    assert _leftovers(cache) == []


def test_an_interrupted_download_is_not_left_as_a_complete_file(server, cache):
    base, _, _ = server
    url = f"{base}/broken/w.pth"
    with pytest.raises(WeightsUnavailableError, match="bytes"):
        download_url(url)
    assert not os.path.exists(url_cache_path(url)) and _leftovers(cache) == []


def test_without_network_the_error_names_the_url_and_the_cache_path(cache, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/beit/encoder.pkl"
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_weights(url)
    assert url in str(err.value) and url_cache_path(url) in str(err.value)
    monkeypatch.setenv("BEIT_LIGHTNING_OFFLINE", "1")  # the same without trying
    entry = get_entry("beit_base_patch16_224_pt22k")
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_weights(entry.name)
    assert entry.url in str(err.value) and url_cache_path(entry.url) in str(err.value)
    assert f"beit-lightning-weights download {entry.name}" in str(err.value)


def _compose(overrides, output_dir):
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"output_dir={output_dir}"])


@pytest.mark.parametrize("overrides, name", [
    (["task=finetune", "model=beit_base", "init_checkpoint=beit_base_patch16_224_pt22k"], "beit_base_patch16_224_pt22k"),
    (["tokenizer=dall_e", "model=beit_base", "data.tokenizer_size=112"], "dall_e_encoder"),
])
def test_a_name_without_network_and_cache_stops_before_any_work(overrides, name, tmp_path, offline_cache):
    url = get_entry(name).url
    with pytest.raises(ConfigError) as err:
        train(_compose(overrides, tmp_path / "run"))
    assert url in str(err.value) and url_cache_path(url) in str(err.value)
    assert not (tmp_path / "run").exists(), "nothing may be written before the configuration is validated"


def test_a_registry_name_must_fit_the_model(tmp_path):
    cfg = _compose(["task=finetune", "model=beit_small", "init_checkpoint=beit_large_patch16_224_pt22k"], tmp_path)
    with pytest.raises(ConfigError, match="add model=beit_large"):
        train(cfg)


# --- stand-ins of the published files --------------------------------------------------------------------

def _save_dall_e(path: Path, kind: str, **sizes) -> torch.nn.Module:
    """A random-weight module pickled as OpenAI's encoder.pkl / decoder.pkl were (tests/openai_dall_e)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, DALL_E_STAND_IN)
    try:
        module = getattr(importlib.import_module(f"dall_e.{kind}"), kind.capitalize())(**sizes)
        torch.save(module, path)
    finally:
        sys.path.remove(DALL_E_STAND_IN)
        for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
            del sys.modules[name]
    return module


@pytest.mark.slow
def test_tokenizer_dall_e_with_its_file_in_the_cache_just_runs(tmp_path, offline_cache):
    """tokenizer=dall_e with no path: the registry's encoder.pkl, found in the cache (no request)."""
    _save_dall_e(Path(url_cache_path(get_entry("dall_e_encoder").url)), "encoder", n_hid=16, n_blk_per_group=1)
    _save_dall_e(Path(url_cache_path(get_entry("dall_e_decoder").url)), "decoder", n_hid=16, n_blk_per_group=1,
                 n_init=8)
    cfg = _compose(["tokenizer=dall_e", "tokenizer.decoder_path=dall_e_decoder"], tmp_path)
    assert cfg.tokenizer.path == "dall_e_encoder"
    tokenizer = instantiate(cfg.tokenizer)
    assert isinstance(tokenizer, DallETokenizer) and tokenizer.vocab_size == 8192 and tokenizer.can_decode
    codes = tokenizer.encode(torch.rand(1, 3, 112, 112))
    assert codes.shape == (1, 14, 14) and int(codes.max()) < 8192
    assert tokenizer.decode(codes).shape == (1, 3, 112, 112)


def test_a_pickle_that_runs_code_is_refused_by_every_reader(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, path)
    for read in (lambda: load_checkpoint(BeitForMaskedImageModeling("beit_lightning_micro_patch8_32", vocab_size=8), path),
                 lambda: load_tokenizer(path)):
        with pytest.raises(UnsafeWeightsError) as err:
            read()
        assert str(path) in str(err.value) and "system" in str(err.value)
    with pytest.raises(ValueError, match="refusing to load"):
        DallETokenizer.from_openai(path)


def _official(state: dict, prefix_from: str = "backbone.") -> dict:
    return {k[len(prefix_from):] if k.startswith(prefix_from) else k: v for k, v in state.items()}


def _stand_in(entry: WeightsEntry, model_cfg) -> dict:
    """A state dict laid out as the entry's published file, from a randomly initialised network of the
    entry's own size (on the meta device: only names and shapes)."""
    size = entry.model.split("_")[-1]  # beit_base, beit_v2_base
    dims = {"base": dict(embed_dim=768, depth=12, num_heads=12), "large": dict(embed_dim=1024, depth=24, num_heads=16)}
    if entry.format == "official_segmentation":
        from beit_lightning.models import create_segmenter

        seg = create_segmenter(entry.architecture, num_classes=entry.num_classes, img_size=entry.resolution,
                               out_indices=list(model_cfg.seg_out_indices), channels=model_cfg.seg_channels,
                               arch=dict(use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1))
        state = {("backbone." + k[len("neck."):] if k.startswith("neck.") else k): v for k, v in seg.state_dict().items()}
        return {"meta": {"CLASSES": list(range(150))}, "state_dict": state}
    if entry.num_classes == 0:  # pre-training: shared relative position bias, mask token, LM head
        mim = BeitForMaskedImageModeling(entry.architecture, vocab_size=8192, **dims[size])
        state = _official(mim.state_dict())
        if entry.name.startswith("beitv2"):  # BEiT v2's CLS pre-training head: two more blocks
            for key, value in list(state.items()):
                if key.startswith(("blocks.10.", "blocks.11.")):
                    state[f"cls_pt_layers.{int(key.split('.')[1]) - 10}.{key.split('.', 2)[2]}"] = value
        return {"model": state}
    net = timm.create_model(entry.architecture, num_classes=entry.num_classes, img_size=entry.resolution,
                            use_abs_pos_emb=False, use_rel_pos_bias=True)
    return {"model": net.state_dict()}


BACKBONE_ENTRIES = [e.name for e in list_entries() if e.format in ("official", "official_segmentation")]


@pytest.mark.parametrize("name", BACKBONE_ENTRIES)
def test_every_backbone_entry_loads_into_the_model_its_config_builds(name, tmp_path, monkeypatch):
    """The entry's format and model config: its published layout (a stand-in) loads with strict=True into
    the network that `model=<entry.model>` builds for the task the file serves, at the file's resolution.
    Everything is built on the meta device (names and shapes only), so the random initialisation is skipped."""
    for module in (timm.models.beit, *[sys.modules[m] for m in ("beit_lightning.models.beit",) if m in sys.modules]):
        if hasattr(module, "trunc_normal_"):
            monkeypatch.setattr(module, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)
    entry = get_entry(name)
    seg = entry.format == "official_segmentation"
    overrides = [f"model={entry.model}", f"model.img_size={entry.resolution}"]
    if seg:
        overrides += ["task=segmentation", "data=ade20k", f"task.num_classes={entry.num_classes}"]
    elif entry.num_classes:
        overrides += ["task=finetune", f"task.num_classes={entry.num_classes}"]
    else:  # a pre-trained encoder: into fine-tuning (its head starts fresh) and into masked image modeling
        overrides += ["task=finetune", "task.num_classes=1000"]
    cfg = _compose(overrides, tmp_path)
    with torch.device("meta"):
        target = instantiate(cfg.task.model)
        checkpoint = _stand_in(entry, cfg.model)
    result = load_checkpoint(target, checkpoint, strict=True)
    assert result.source == entry.format and not result.missing and not result.unexpected and not result.mismatched
    if seg:
        assert not result.initialised  # the whole network comes from the file
    elif entry.num_classes:
        assert not result.initialised and not any(d.startswith("head.") for d in result.dropped)
    else:
        assert sorted(result.initialised) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
        assert any(d.startswith("lm_head") for d in result.dropped)
        if name.startswith("beitv2"):
            assert any(d.startswith("cls_pt_layers.") for d in result.dropped)
        cfg = _compose([f"model={entry.model}", "tokenizer=dall_e", "data.tokenizer_size=112"], tmp_path)
        with torch.device("meta"):
            mim = instantiate(cfg.task.model)
        result = load_checkpoint(mim, checkpoint, strict=True)
        assert result.source == "official" and not (result.missing or result.unexpected or result.initialised)


@pytest.mark.slow
def test_the_tokenizer_and_inception_entries_read_their_formats(tmp_path, offline_cache):
    from torchmetrics.image.fid import FrechetInceptionDistance

    pytest.importorskip("torch_fidelity")
    from test_vitgan import _inception_weights_file

    encoder = get_entry("dall_e_encoder")
    _save_dall_e(tmp_path / encoder.filename, "encoder", n_hid=16, n_blk_per_group=1)
    assert DallETokenizer.from_openai(tmp_path / encoder.filename).vocab_size == 8192  # conf/tokenizer/dall_e.yaml's
    inception = get_entry("inception_v3_fid")
    path = Path(url_cache_path(inception.url))
    path.parent.mkdir(parents=True, exist_ok=True)
    _inception_weights_file(path)
    state = torch.load(path, weights_only=True)
    assert state["fc.weight"].shape[0] == inception.num_classes
    fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=resolve_weights(inception.name))
    assert fid.inception is not None
    from test_vqkd import _official_vqkd_state

    for entry in list_entries("vqkd"):  # BEiT v2's VQ-KD, as conf/tokenizer/vqkd.yaml reads it (8192 codes, 224px)
        assert entry.format == "official_vqkd"
        path = Path(url_cache_path(entry.url))
        path.parent.mkdir(parents=True, exist_ok=True)
        depth = int(entry.name.split("decoder_")[1][0])
        torch.save({"model": _official_vqkd_state(depth, 512, img=224, patch=16, vocab=8192, code=32)}, path)
        tokenizer = load_tokenizer(entry.name, vocab_size=8192, image_size=224)
        assert tokenizer.encode(torch.rand(1, 3, 224, 224)).shape == (1, 14, 14)


def test_every_entry_is_complete():
    assert len(REGISTRY) >= 30
    for entry in REGISTRY.values():
        assert entry.url.startswith("https://") and entry.licence and entry.source.startswith("https://")
        assert entry.sha256 is None or len(entry.sha256) == 64
        if entry.model is not None:
            assert timm.is_model(entry.architecture) and (TESTS.parent / "conf" / "model" / f"{entry.model}.yaml").is_file()


# --- Hugging Face Hub and timm sources, offline over a local Hub cache -------------------------------------

def _hub_cache(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def test_hf_hub_names_read_a_transformers_folder_from_the_cache(offline_hub, tmp_path):
    pytest.importorskip("transformers")
    from beit_lightning.huggingface import export_hf

    model = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2)
    folder = Path(export_hf(model.eval(), tmp_path / "export", verify=False))
    _hub_cache(offline_hub, "someone/beit-tiny", {p.name: p.read_bytes() for p in folder.iterdir()})
    fresh = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2)
    result = load_checkpoint(fresh, "hf-hub:someone/beit-tiny")
    assert result.source == "transformers" and not result.missing
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(WeightsUnavailableError, match="hf-hub:someone/absent"):
        resolve_weights("hf-hub:someone/absent")


def test_timm_names_use_timms_pretrained_config(offline_hub):
    from safetensors.torch import save

    net = timm.create_model("test_vit", pretrained=False)
    repo = timm.models.get_pretrained_cfg("test_vit.r160_in1k").hf_hub_id
    _hub_cache(offline_hub, repo, {"model.safetensors": save({k: v.contiguous() for k, v in net.state_dict().items()}),
                                   "config.json": b'{"architecture": "test_vit"}'})
    fresh = timm.create_model("test_vit", pretrained=False)
    result = load_checkpoint(fresh, "timm:test_vit.r160_in1k")
    assert not result.missing and not result.unexpected
    torch.testing.assert_close(fresh.state_dict(), net.state_dict(), rtol=0, atol=0)


# --- the console script ----------------------------------------------------------------------------------

def test_weights_console_lists_describes_and_downloads(server, cache, capsys, tmp_path):
    assert weights_main(["list", "beitv2_large"]) == 0
    out = capsys.readouterr().out
    assert "beitv2_large_patch16_224_pt1k_ft21k " in out and "beit_base" not in out
    assert weights_main(["info", "dall_e"]) == 0
    out = capsys.readouterr().out
    assert "https://cdn.openai.com/dall-e/encoder.pkl" in out and "absent" in out
    base, folder, requests = server
    (folder / "x.pth").write_bytes(b"12345")
    target = tmp_path / "prefetch"
    assert weights_main(["download", f"{base}/x.pth", "--to", str(target)]) == 0
    assert Path(url_cache_path(f"{base}/x.pth", target)).read_bytes() == b"12345"


def test_info_describes_openai_pickles_and_names_a_refused_file(tmp_path):
    from beit_lightning.info import describe_checkpoint

    _save_dall_e(tmp_path / "encoder.pkl", "encoder", n_hid=16, n_blk_per_group=1, vocab_size=64)
    text = describe_checkpoint(str(tmp_path / "encoder.pkl"))
    assert "OpenAI DALL-E dVAE encoder" in text and "vocab_size=64" in text and "n_hid=16" in text

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    text = describe_checkpoint(str(tmp_path / "evil.pth"))
    assert "not loaded" in text and "refusing to load" in text and "system" in text
