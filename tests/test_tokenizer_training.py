import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from timm.models.vision_transformer import VisionTransformer

from beit_lightning.cli import train
from beit_lightning.data import GeneratedDataModule
from beit_lightning.tasks import TokenizerTraining
from beit_lightning.tasks.tokenizer import codebook_usage
from beit_lightning.tokenizers import VQKD, CosineVectorQuantizer, DiscreteVAE, load_tokenizer, save_tokenizer


def _data(tmp_path, size=32, n=512):
    dm = GeneratedDataModule(mode="tokenizer", num_train=n, num_val=64, image_size=48, tokenizer_size=size, input_size=32,
                             patch_size=8, batch_size=32, num_workers=0, scale=(0.5, 1.0), cache_dir=str(tmp_path))
    dm.setup()
    return dm


def _fit(task, dm, steps, tmp_path):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, check_val_every_n_epoch=1000,
                         default_root_dir=tmp_path)
    trainer.fit(task, dm)
    return trainer


def _tiny_vqkd(teacher_dim=24):
    return VQKD(teacher_dim=teacher_dim, vocab_size=32, code_dim=8, image_size=32, patch_size=8, embed_dim=32, depth=1,
                num_heads=2, decoder_dim=32, decoder_depth=1, decay=0.9)


def _tiny_teacher():
    torch.manual_seed(123)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=0)


@pytest.mark.slow
def test_dvae_training_lowers_reconstruction_error_and_uses_codes(tmp_path):
    pl.seed_everything(0)
    tokenizer = DiscreteVAE(vocab_size=128, image_size=32, n_hid=32, n_blk_per_group=1, n_init=32,
                            tau_anneal_steps=250, kl_warmup_steps=80, kl_weight=1.0)
    dm = _data(tmp_path)
    batch = next(iter(dm.val_dataloader()))["tokenizer_image"]

    def recon_error():
        return F.mse_loss(tokenizer.decode(tokenizer.encode(batch)), batch).item()

    before = recon_error()
    _fit(TokenizerTraining(tokenizer, lr=3e-3, warmup_steps=20), dm, 250, tmp_path)
    after = recon_error()
    _, used = codebook_usage(torch.bincount(tokenizer.encode(batch).flatten(), minlength=128))
    assert after < 0.6 * before, (before, after)
    assert used * 128 >= 16, f"only {used * 128:.0f} codes in use"


def test_vqkd_training_raises_teacher_similarity_and_keeps_codes_in_use(tmp_path):
    pl.seed_everything(0)
    tokenizer, teacher = _tiny_vqkd(), _tiny_teacher()
    task = TokenizerTraining(tokenizer, teacher=teacher, lr=3e-3, warmup_steps=10, weight_decay=0.0)
    dm = _data(tmp_path, n=256)
    batch = next(iter(dm.val_dataloader()))["tokenizer_image"]

    def cosine():
        tokenizer.eval()
        with torch.no_grad():
            return task.losses(batch)["cosine"].item()

    before = cosine()
    _fit(task, dm, 120, tmp_path)
    after = cosine()
    _, used = codebook_usage(torch.bincount(tokenizer.encode(batch).flatten(), minlength=32))
    assert after > before + 0.2, (before, after)
    assert used >= 0.25, f"codebook usage {used:.2f} fell below the 25% floor"
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


def test_cosine_quantizer_ema_and_dead_code_restart():
    torch.manual_seed(0)
    q = CosineVectorQuantizer(num_codes=4, dim=3, decay=0.5, dead_threshold=0.2)
    q.embedding.copy_(F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]]), dim=-1))
    q.embed_sum.copy_(q.embedding)
    z = torch.tensor([[[2.0, 0.2, 0.0], [0.1, 3.0, 0.0], [1.0, 0.1, 0.1]]])
    q.eval()
    assert q(z)[1].tolist() == [[0, 1, 0]]  # nearest by cosine, whatever the norm
    q.train()
    quantized, idx, commitment = q(z)
    assert torch.allclose(q.embedding.norm(dim=-1), torch.ones(4))
    assert q.embedding[0, 1] > 0  # code 0 moved towards its assigned vectors
    assert commitment > 0 and quantized.requires_grad is False
    # codes 2 and 3 got nothing: their counts decay (1 -> 0.5 -> 0.25 -> 0.125) below 0.2 and they restart
    for _ in range(2):
        q(z)
    restarted = q.embedding[2:]
    zs = F.normalize(z[0], dim=-1)
    assert all(any(torch.allclose(r, v) for v in zs) for r in restarted)


def test_tokenizer_checkpoints_round_trip_with_identical_tokens(tmp_path):
    images = torch.rand(3, 3, 32, 32)
    for tokenizer in (DiscreteVAE(vocab_size=64, image_size=32, n_hid=16, n_blk_per_group=1, n_init=16), _tiny_vqkd()):
        path = tmp_path / f"{type(tokenizer).__name__}.pt"
        save_tokenizer(tokenizer, path)
        assert path.stat().st_size < 5e6 and not list(tmp_path.glob("*.tmp-*"))
        loaded = load_tokenizer(path, vocab_size=tokenizer.vocab_size, image_size=32)
        assert type(loaded) is type(tokenizer)
        assert torch.equal(loaded.encode(images), tokenizer.eval().encode(images))
        with pytest.raises(ValueError, match="tokenizer.vocab_size="):
            load_tokenizer(path, vocab_size=8192)
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a beit-lightning tokenizer checkpoint"):
        load_tokenizer(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="task=tokenizer"):
        load_tokenizer(tmp_path / "missing.pt")


def test_teacher_is_required_matched_and_kept_out_of_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        TokenizerTraining(_tiny_vqkd())
    with pytest.raises(ValueError, match="teacher_dim=24"):
        TokenizerTraining(_tiny_vqkd(teacher_dim=16), teacher=_tiny_teacher())
    task = TokenizerTraining(_tiny_vqkd(), teacher=_tiny_teacher(), warmup_steps=1)
    trainer = _fit(task, _data(tmp_path, n=64), 2, tmp_path)
    trainer.save_checkpoint(tmp_path / "t.ckpt")
    state = torch.load(tmp_path / "t.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith("teacher.")] and any(k.startswith("tokenizer.") for k in state)


def _compose(overrides):
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.slow
def test_demo_pipeline_train_tokenizer_then_pretrain_with_it(tmp_path):
    """The demo's two stages through the Hydra app: a dVAE tokenizer on generated data, exported,
    then masked image modeling with it loaded from its checkpoint."""
    stage1 = tmp_path / "tokenizer"
    train(_compose(["experiment=smoke_tokenizer", f"output_dir={stage1}", "data.num_train=64", "data.num_val=32",
                    "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "task.tokenizer.n_hid=16",
                    "task.tokenizer.n_init=16", "trainer.enable_progress_bar=false"]))
    assert (stage1 / "tokenizer.pt").is_file()
    assert list((stage1 / "csv" / "images").glob("reconstructions_step*.png"))
    header = (stage1 / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/perplexity" in header and "val/codes_used" in header and "val/recon_mse" in header

    stage2 = tmp_path / "pretrain"
    metric = train(_compose(["experiment=smoke", "tokenizer=dvae", f"tokenizer.checkpoint={stage1 / 'tokenizer.pt'}",
                             "tokenizer.vocab_size=512", "tokenizer.image_size=64", f"output_dir={stage2}",
                             "data.num_train=64", "data.num_val=32", "trainer.max_epochs=1",
                             "trainer.enable_progress_bar=false"]))
    assert metric is not None and metric < 10
    assert (stage2 / "checkpoints" / "last.ckpt").is_file()
