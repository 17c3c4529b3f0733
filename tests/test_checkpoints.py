import pytest
import timm
import torch

from beit_lightning.checkpoints import CheckpointMismatchError, load_checkpoint
from conftest import micro_model
from reference_beit import random_official_state_dict


def _official(**kw):
    args = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, grid=4, vocab_size=50)
    args.update(kw)
    return random_official_state_dict(**args)


def test_official_pretraining_checkpoint_file_loads(tmp_path):
    sd = _official()
    path = tmp_path / "beit_micro_pt.pth"
    torch.save({"model": sd, "epoch": 799, "args": {"lr": 1.5e-3}}, path)
    model = micro_model(vocab_size=50)
    result = load_checkpoint(model, path)
    assert result.source == "official" and not result.missing and not result.unexpected
    torch.testing.assert_close(model.mask_token, sd["mask_token"])
    torch.testing.assert_close(model.lm_head.weight, sd["lm_head.weight"])
    torch.testing.assert_close(
        model.backbone.rel_pos_bias.relative_position_bias_table, sd["rel_pos_bias.relative_position_bias_table"]
    )
    torch.testing.assert_close(model.backbone.blocks[1].gamma_2, sd["blocks.1.gamma_2"])


def test_shape_mismatch_and_missing_keys_are_listed_and_model_untouched():
    sd = _official(vocab_size=8192)
    del sd["blocks.1.mlp.fc2.bias"]
    sd["surplus.weight"] = torch.zeros(1)
    model = micro_model(vocab_size=50)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(model, {"model": sd})
    text = str(err.value)
    assert "lm_head.weight (8192, 64) vs (50, 64)" in text
    assert "backbone.blocks.1.mlp.fc2.bias" in text and "surplus.weight" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # strict=False loads the matching part and reports the rest
    result = load_checkpoint(model, {"model": sd}, strict=False)
    assert [m[0] for m in result.mismatched] == ["lm_head.weight", "lm_head.bias"]
    torch.testing.assert_close(model.mask_token, sd["mask_token"])


def test_our_state_dict_round_trips_and_loads_into_plain_timm_beit():
    src = micro_model(vocab_size=50)
    dst = micro_model(vocab_size=50)
    load_checkpoint(dst, src.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    # into a timm Beit with per-layer relative position tables: the shared table is copied into each block
    beit = timm.create_model("beit_lightning_micro_patch8_32", num_classes=0, use_fc_norm=False)
    result = load_checkpoint(beit, src.state_dict())
    assert "mask_token" in result.dropped and "lm_head.weight" in result.dropped
    for blk in beit.blocks:
        torch.testing.assert_close(blk.attn.relative_position_bias_table, src.backbone.rel_pos_bias.relative_position_bias_table)


def test_missing_file_and_foreign_objects(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(micro_model(), tmp_path / "nope.pth")
    path = tmp_path / "odd.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": torch.nn.Linear(1, 1)}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_checkpoint(micro_model(), path)


def test_newest_checkpoint_picks_the_highest_step_then_a_resumable_file(tmp_path):
    from beit_lightning.checkpoints import newest_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    full = {"optimizer_states": [], "loops": {}, "state_dict": {}}
    torch.save({**full, "global_step": 30}, folder / "last.ckpt")
    torch.save({**full, "global_step": 20}, folder / "epoch001-step0000020.ckpt")
    torch.save({**full, "global_step": 37}, tmp_path / "hpc_ckpt_1.ckpt")  # SLURM's, outside checkpoints/
    assert newest_checkpoint(tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")
    # at equal steps a weights-only file (no optimizer or loop state) loses, even when written later
    torch.save({"state_dict": {}, "global_step": 37}, folder / "weights-step37.ckpt")
    assert newest_checkpoint(tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")
    # an unreadable file is passed over with a warning naming it
    (folder / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="broken.ckpt"):
        assert newest_checkpoint(tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")
    assert newest_checkpoint(tmp_path / "elsewhere") is None


def test_newest_checkpoint_refuses_to_start_afresh_when_no_checkpoint_reads(tmp_path):
    from beit_lightning.checkpoints import newest_checkpoint

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="cannot resume.*last.ckpt"):
        newest_checkpoint(tmp_path)


def test_a_fine_tuning_checkpoint_with_an_ema_copy_loads_strictly():
    """A run with task.ema_decay stores model_ema.module.* beside model.*: the weights load, the EMA copy
    is not reported as unused (init_checkpoint from such a run used to fail)."""
    source = timm.create_model("beit_lightning_micro_patch8_32", num_classes=5)
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    state.update({f"model_ema.module.{k}": v + 1 for k, v in source.state_dict().items()})
    target = timm.create_model("beit_lightning_micro_patch8_32", num_classes=5)
    result = load_checkpoint(target, {"state_dict": state, "global_step": 3})
    assert not result.unexpected and not result.missing
    torch.testing.assert_close(target.head.weight, source.head.weight)  # the model, not its EMA
