"""The BEiT paper's ablations (Table 4): random masking, pixel targets, the loss on all patches, each
checked against a hand computation; and ``beit-lightning-ablate`` end to end at a tiny budget."""

import csv
import math
import re

import numpy as np
import pytest
import torch

from beit_lightning.ablate import VARIANTS, Ordering, _mean_std, main, orderings
from beit_lightning.data import BeitDataModule, RandomMaskGenerator
from beit_lightning.tasks import MaskedImageModeling
from conftest import ColourTokenizer, micro_model

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _batch(seed=0, b=3, img=32, grid=4, count=6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, grid * grid, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(grid * grid, generator=g)[:count]] = True
    return {"image": torch.randn(b, 3, img, img, generator=g), "tokenizer_image": torch.rand(b, 3, img, img, generator=g),
            "mask": mask.view(b, grid, grid)}


# --- masking -------------------------------------------------------------------------------------
def test_random_masks_have_the_exact_count_and_are_uniform():
    gen = RandomMaskGenerator((6, 5), 11, seed=3)
    masks = torch.stack([gen() for _ in range(3000)])
    assert masks.shape == (3000, 6, 5) and masks.dtype == torch.bool
    assert (masks.flatten(1).sum(1) == 11).all()
    freq = masks.float().mean(0)  # every patch is masked with probability 11/30
    assert torch.allclose(freq, torch.full_like(freq, 11 / 30), atol=0.04)
    # not blockwise: masked patches have fewer masked neighbours than blocks would give (uniform: (11-1)/29 each)
    right = (masks[:, :, 1:] & masks[:, :, :-1]).sum() / masks[:, :, :-1].sum()
    assert float(right) == pytest.approx(10 / 29, abs=0.03)
    again = RandomMaskGenerator((6, 5), 11, seed=3)
    assert torch.equal(torch.stack([again() for _ in range(5)]), masks[:5])  # seeded: reproducible
    with pytest.raises(ValueError, match="impossible"):
        RandomMaskGenerator(4, 17)


def test_data_module_masking_random_draws_random_masks_of_the_blockwise_count():
    data = BeitDataModule(mode="pretrain", input_size=32, tokenizer_size=32, patch_size=8, num_masking_patches=6,
                          min_num_patches=2, masking="random", num_workers=0)
    assert isinstance(data.mask_generator, RandomMaskGenerator) and data.mask_generator.input_size == (4, 4)
    from PIL import Image

    sample = data.train_transform(Image.new("RGB", (40, 40), (120, 30, 200)))
    assert sample["mask"].shape == (4, 4) and int(sample["mask"].sum()) == 6
    with pytest.raises(ValueError, match="masking must be one of"):
        BeitDataModule(mode="pretrain", masking="checkerboard")


# --- the losses, by hand ----------------------------------------------------------------------------
def _hand_features(task, batch):
    with torch.no_grad():
        return task.model.forward_features(batch["image"], batch["mask"])[:, 1:]  # B x N x D, cls dropped


def test_token_loss_on_masked_patches_is_cross_entropy_at_the_masked_tokens():
    task = MaskedImageModeling(micro_model(vocab_size=64), ColourTokenizer(), pixel_mean=MEAN, pixel_std=STD).eval()
    batch = _batch()
    feats, tokens = _hand_features(task, batch), ColourTokenizer().encode(batch["tokenizer_image"]).flatten(1)
    terms = []
    with torch.no_grad():
        for b in range(3):
            for n in range(16):
                if batch["mask"][b].flatten()[n]:
                    logits = task.model.lm_head(feats[b, n])
                    terms.append(torch.logsumexp(logits, 0) - logits[tokens[b, n]])
        loss = task._step(batch)[0]
    assert len(terms) == 18
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)


def test_token_loss_on_all_patches_covers_every_patch():
    task = MaskedImageModeling(micro_model(vocab_size=64), ColourTokenizer(), loss_on="all").eval()
    batch = _batch(seed=1)
    feats, tokens = _hand_features(task, batch), ColourTokenizer().encode(batch["tokenizer_image"]).flatten(1)
    with torch.no_grad():
        logits = task.model.lm_head(feats)  # B x N x V
        hand = float((torch.logsumexp(logits, -1) - logits.gather(-1, tokens[..., None])[..., 0]).mean())
        loss, predictions, targets = task._step(batch)
    assert predictions.shape == (48, 64) and targets.shape == (48,)
    assert float(loss) == pytest.approx(hand, rel=1e-5)
    masked_only = MaskedImageModeling(task.model, ColourTokenizer()).eval()
    with torch.no_grad():
        assert float(masked_only._step(batch)[0]) != pytest.approx(hand, rel=1e-3)  # visible patches count here


def _hand_pixels(image, b, row, col, p=8, norm=False):
    """One patch's target from the normalised image, pixel by pixel: (row, column, channel) order in [0, 1]."""
    values = [float(image[b, c, row * p + y, col * p + x]) * STD[c] + MEAN[c] for y in range(p) for x in range(p)
              for c in range(3)]
    values = np.array(values)
    return (values - values.mean()) / np.sqrt(values.var(ddof=1) + 1e-6) if norm else values


@pytest.mark.parametrize("norm", [False, True])
def test_pixel_loss_is_mse_against_the_masked_patches_pixels(norm):
    model = micro_model(vocab_size=8 * 8 * 3)
    task = MaskedImageModeling(model, None, target="pixels", pixel_norm=norm, pixel_mean=MEAN, pixel_std=STD).eval()
    assert task.tokenizer is None
    batch = _batch(seed=2)
    feats = _hand_features(task, batch)
    errors = []
    for b in range(3):
        for n in range(16):
            if batch["mask"][b].flatten()[n]:
                prediction = task.model.lm_head(feats[b, n]).detach().double().numpy()
                errors.append(((prediction - _hand_pixels(batch["image"], b, n // 4, n % 4, norm=norm)) ** 2).mean())
    with torch.no_grad():
        loss, predictions, targets = task._step(batch)
    assert predictions.shape == targets.shape == (18, 192)
    assert float(loss) == pytest.approx(float(np.mean(errors)), rel=1e-4)


def test_pixel_target_needs_a_head_of_patch_pixels_and_tokens_need_a_tokenizer():
    with pytest.raises(ValueError, match=r"task.model.vocab_size=192"):
        MaskedImageModeling(micro_model(vocab_size=64), None, target="pixels")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        MaskedImageModeling(micro_model(vocab_size=64), None)
    with pytest.raises(ValueError, match="target must be one of"):
        MaskedImageModeling(micro_model(vocab_size=64), ColourTokenizer(), target="features")


def test_pixel_variant_composes_and_builds_from_the_configs(tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from beit_lightning.cli import validate_config

    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=smoke", f"output_dir={tmp_path}", "task.target=pixels", "task.tokenizer=null",
            "task.model.vocab_size=192", "data.masking=random"])
    validate_config(cfg)
    task = instantiate(cfg.task)
    assert task.target == "pixels" and task.tokenizer is None and task.pixel_mean == tuple(cfg.data.mean)
    assert instantiate(cfg.data).masking == "random"


# --- the orderings ------------------------------------------------------------------------------------
def test_orderings_compare_the_margin_with_the_seed_spread():
    table = {v: {"finetune_top1": [], "probe_top1": [], "pretrain_val_loss": [], "pretrain_token_acc": []}
             for v in ("beit", "scratch", "pixels", "no_blockwise")}
    table["beit"]["finetune_top1"] = [0.50, 0.54]  # mean 0.52, std 0.028
    table["scratch"]["finetune_top1"] = [0.30, 0.32]  # 20 points below: holds
    table["pixels"]["finetune_top1"] = [0.51, 0.57]  # 2 points above, spread 4.2: unresolved
    table["no_blockwise"]["finetune_top1"] = [0.60, 0.62]  # 9 points above: reversed
    for v in table:
        table[v]["probe_top1"] = [0.2]  # one seed: no spread
    found = {(o.claim, o.metric): o for o in orderings(table)}
    ft = "fine-tune top-1 (%)"
    assert found[("BEiT > scratch", ft)].margin == pytest.approx(21.0)
    assert found[("BEiT > scratch", ft)].spread == pytest.approx(100 * math.sqrt(0.0008))
    assert found[("BEiT > scratch", ft)].holds
    assert found[("tokens > pixels", ft)].verdict.startswith("unresolved (within")
    assert found[("blockwise >= random", ft)].verdict.startswith("reversed")
    assert found[("BEiT > scratch", "linear probe top-1 (%)")].verdict == "unresolved: one seed has no spread"
    assert ("masked > all patches", ft) not in found  # all_tokens was not run
    assert Ordering("x", "a", "b", "m", math.nan, 1.0).verdict == "not measured"


# --- planning -------------------------------------------------------------------------------------------
def test_a_photo_folder_without_validation_split_gets_one_and_its_class_count(tmp_path):
    from PIL import Image

    from beit_lightning.ablate import SCALES, plan

    photos = tmp_path / "photos"
    for c, colour in enumerate(("red", "green", "blue")):
        (photos / f"class{c}").mkdir(parents=True)
        for i in range(5 + c):
            Image.new("RGB", (20 + i, 16), colour).save(photos / f"class{c}" / f"{i}.png")
    runs, setup = plan(str(tmp_path / "out"), SCALES["micro"], ["beit", "pixels", "scratch"], [0, 1],
                       ["data=imagefolder", f"data.root={photos}"])
    split = tmp_path / "out" / "data"
    assert setup.num_classes == 3 and setup.tokenizer_size == 64 and not setup.generated
    for c in range(3):  # every photo once, in train or val; a fifth (at least one) of each class for validation
        train, val = list((split / "train" / f"class{c}").iterdir()), list((split / "val" / f"class{c}").iterdir())
        assert len(train) + len(val) == 5 + c and len(val) == max(1, round((5 + c) * 0.2))
        assert sorted(p.resolve().name for p in train + val) == sorted(f"{i}.png" for i in range(5 + c))
    stages = [r.stage for r in runs]
    assert stages == ["tokenizer"] + ["pretrain"] * 4 + ["finetune"] * 6 + ["probe"] * 6  # dependencies first
    for run in runs:  # an unfinished run resumes its newest checkpoint (a fresh one starts from scratch)
        assert f"data.root={split}" in run.overrides and "data.num_train=128" not in run.overrides
        assert "ckpt_path=last" in run.overrides
        assert "data.batch_size=8" in run.overrides  # 15 training images: the batches of 32 and 64 would drop them all
    finetune = [r for r in runs if r.stage == "finetune"]
    assert all("task.num_classes=3" in r.overrides for r in finetune)
    assert [any(o.startswith("init_checkpoint=") for o in r.overrides) for r in finetune] == [True] * 4 + [False] * 2
    pixels = next(r for r in runs if r.variant == "pixels")
    assert {"task.target=pixels", "task.tokenizer=null", "task.model.vocab_size=192"} <= set(pixels.overrides)


def test_run_all_skips_finished_runs_and_runs_the_rest_in_stage_order(tmp_path):
    import json

    from beit_lightning.ablate import RESULT_FILE, Run, run_all

    runs = [Run(stage, "beit", seed, str(tmp_path / stage / f"seed{seed}"), ["ckpt_path=last"])
            for stage in ("probe", "pretrain", "finetune") for seed in (0, 1)]
    (tmp_path / "pretrain" / "seed0").mkdir(parents=True)
    (tmp_path / "pretrain" / "seed0" / RESULT_FILE).write_text(json.dumps({"metrics": {}}))
    executed = []

    def fake_training(run):  # what a finished run leaves: a last checkpoint and its validation metrics
        executed.append(run.name)
        (tmp_path / run.stage / f"seed{run.seed}" / "checkpoints").mkdir(parents=True, exist_ok=True)
        (tmp_path / run.stage / f"seed{run.seed}" / "checkpoints" / "last.ckpt").write_bytes(b"")
        (tmp_path / run.stage / f"seed{run.seed}" / "csv").mkdir(exist_ok=True)
        (tmp_path / run.stage / f"seed{run.seed}" / "csv" / "metrics.csv").write_text(
            "epoch,val/loss,val/mlm_acc,val/acc1\n0,2.0,0.1,\n0,1.5,0.2,0.3\n")

    assert run_all(runs, execute=fake_training, log=lambda _: None) == 5
    assert executed == ["pretrain/beit/seed1", "finetune/beit/seed0", "finetune/beit/seed1", "probe/beit/seed0",
                        "probe/beit/seed1"]
    result = json.loads((tmp_path / "pretrain" / "seed1" / RESULT_FILE).read_text())
    assert result["metrics"] == {"val/loss": 1.5, "val/mlm_acc": 0.2}  # the last logged values
    assert run_all(runs, execute=fake_training, log=lambda _: None) == 0  # everything finished now
    (tmp_path / "probe" / "seed1" / RESULT_FILE).unlink()  # killed before its result was written: runs again
    assert run_all(runs, execute=fake_training, log=lambda _: None) == 1 and executed[-1] == "probe/beit/seed1"


# --- the command, end to end ---------------------------------------------------------------------------
TINY = ["--seeds", "2", "--tokenizer-epochs", "1", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--probe-epochs",
        "1", "--no-plot", "model.img_size=32", "data.num_train=16", "data.num_val=16", "data.batch_size=16",
        "data.num_workers=0", "data.samples_per_shard=16"]


@pytest.mark.slow
def test_ablate_command_writes_the_table_and_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "ablate"
    assert main(["--out", str(out), *TINY]) == 0
    first = capsys.readouterr().out
    runs = 1 + 5 * 2 + 6 * 2 * 2  # tokenizer, pre-training variants x seeds, (fine-tune + probe) x variants x seeds
    assert f"{runs} run(s) executed, 0 skipped" in first
    text = (out / "ablation.md").read_text()
    for name in VARIANTS:
        assert re.search(rf"^\| {name} \|", text, flags=re.M), name
    with open(out / "ablation.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == list(VARIANTS)
    assert all(r["seeds"] == "2" and 0.0 <= float(r["finetune_top1_mean"]) <= 1.0 for r in rows.values())
    assert rows["scratch"]["pretrain_val_loss_mean"] == "nan" and rows["pixels"]["pretrain_token_acc_mean"] == "nan"
    # the ordering statements are the numbers of the table: margins recomputed from the CSV
    for claim, better, worse in (("BEiT > scratch", "beit", "scratch"), ("tokens > pixels", "beit", "pixels")):
        margin = 100 * (float(rows[better]["finetune_top1_mean"]) - float(rows[worse]["finetune_top1_mean"]))
        spread = 100 * max(float(rows[better]["finetune_top1_std"]), float(rows[worse]["finetune_top1_std"]))
        line = next(li for li in text.splitlines() if li.startswith(f"- {claim} on fine-tune"))
        assert f"margin {margin:+.1f}, spread {spread:.1f}" in line
        verdict = "holds" if margin > spread else "reversed" if -margin > spread else "unresolved"
        assert f"**{verdict}" in line
    # a second call finds every run finished and only rewrites the summary
    (out / "ablation.md").unlink()
    assert main(["--out", str(out), *TINY]) == 0
    assert f"0 run(s) executed, {runs} skipped" in capsys.readouterr().out
    assert (out / "ablation.md").read_text() == text


def test_mean_std_uses_the_sample_standard_deviation():
    mean, std, n = _mean_std([0.1, 0.3, 0.5])
    assert (mean, n) == (pytest.approx(0.3), 3) and std == pytest.approx(0.2)
    assert math.isnan(_mean_std([0.4])[1]) and _mean_std([])[2] == 0
