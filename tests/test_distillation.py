"""DeiT's distillation in ImageClassification: the loss against hand computations on fixed logits and
against timm's TokenDistillationTask, the averaged evaluation logits, a frozen teacher that stays out of
checkpoints, clear errors, and experiment=smoke_distill through the app."""

import math
import os

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from timm.task import TokenDistillationTask

from beit_lightning.cli import train
from beit_lightning.data import GeneratedDataModule
from beit_lightning.models import create_classifier, distillation_loss
from beit_lightning.tasks import ImageClassification
from beit_lightning.tasks.classification import create_teacher
from conftest import last_logged

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)

# fixed logits: 2 images, 3 classes
STUDENT = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
TEACHER = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.0, 2.0]])


def _student(num_classes=5):
    return create_classifier("deit_tiny_distilled_patch16_224", num_classes, img_size=32, arch=TINY)


def _teacher(num_classes=5):
    # a DeiT: timm's TokenDistillationTask re-normalises the input when the teacher's pretrained_cfg mean/std
    # differ from the student's (timm's ViT-Ti has 0.5/0.5); ours feeds the student's input as the official code
    return create_classifier("deit_tiny_patch16_224", num_classes, img_size=32, arch=TINY).eval()


def _kl_by_hand(student, teacher, tau):
    """sum over images and classes of p_t * (log p_t - log p_s), at temperature tau, times tau^2."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        zs = [math.exp(v / tau) for v in s_row]
        zt = [math.exp(v / tau) for v in t_row]
        ps, pt = [z / sum(zs) for z in zs], [z / sum(zt) for z in zt]
        total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(ps, pt, strict=True))
    return total * tau * tau


def test_hard_distillation_is_cross_entropy_with_the_teachers_argmax():
    # teacher argmax: class 1 for image 0, class 2 for image 1
    by_hand = -(math.log(math.exp(0.5) / (math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)))
                + math.log(math.exp(3.0) / (math.exp(0.0) + math.exp(1.0) + math.exp(3.0)))) / 2
    assert distillation_loss(STUDENT, TEACHER, "hard").item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_normalisations(tau):
    """official: the summed KL divided by batch x classes; timm's batchmean: by the batch (K = 3 times more)."""
    total = _kl_by_hand(STUDENT, TEACHER, tau)
    numel = distillation_loss(STUDENT, TEACHER, "soft", tau, reduction="numel").item()
    batchmean = distillation_loss(STUDENT, TEACHER, "soft", tau, reduction="batchmean").item()
    assert numel == pytest.approx(total / 6, rel=1e-6)
    assert batchmean == pytest.approx(total / 2, rel=1e-6)
    assert batchmean == pytest.approx(3 * numel, rel=1e-6)


def _task(distillation="hard", teacher=None, **kw):
    args = dict(lr=1e-3, warmup_steps=1, layer_decay=None, mixup=0.0, cutmix=0.0, label_smoothing=0.0,
                distillation=distillation, teacher=_teacher() if teacher is None and distillation != "none" else teacher)
    args.update(kw)
    return ImageClassification(_student(), 5, **args)


@pytest.mark.parametrize("kind, reduction", [("hard", "numel"), ("soft", "batchmean"), ("soft", "numel")])
def test_loss_agrees_with_timms_token_distillation_task(kind, reduction):
    """timm's TokenDistillationTask with task_loss_weight=0.5 is DeiT's alpha=0.5 with a batchmean soft
    term; with the official numel normalisation the soft term is divided by the number of classes (5)."""
    torch.manual_seed(0)
    ours = _task(kind, soft_distillation_reduction=reduction, distillation_tau=2.0)
    theirs = TokenDistillationTask(ours.model, ours.teacher, criterion=torch.nn.CrossEntropyLoss(), distill_type=kind,
                                   task_loss_weight=0.5, temperature=2.0, verbose=False)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    ours.train()
    theirs.train()
    loss, parts = ours.loss(images, labels)
    out = theirs(images, labels)
    torch.testing.assert_close(parts["base_loss"], out["task_loss"])
    factor = 5.0 if (kind, reduction) == ("soft", "numel") else 1.0
    torch.testing.assert_close(parts["distillation_loss"] * factor, out["distill_loss"])
    if factor == 1.0:
        torch.testing.assert_close(loss, out["loss"])


def test_teacher_sees_the_mixed_images_and_the_base_loss_uses_the_mixed_targets():
    """As DeiT's engine.py: mixup first, then the student and the teacher on the same mixed images; the base
    criterion is the soft-target cross-entropy (DistillationLoss(SoftTargetCrossEntropy(), ...))."""
    task = _task("hard", mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    seen = []
    task.teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    student_inputs = []
    task.model.register_forward_pre_hook(lambda m, args: student_inputs.append(args[0].clone()))
    task.train()
    original = torch.randn(4, 3, 32, 32)
    task.log = lambda *a, **k: None  # outside a Trainer
    task.training_step({"image": original.clone(), "label": torch.tensor([0, 1, 2, 3])}, 0)
    torch.testing.assert_close(seen[0], student_inputs[0])
    assert not torch.allclose(seen[0], original)  # mixed (mixup_prob 1)
    soft = torch.softmax(torch.randn(4, 5), -1)  # mixup's targets
    loss, parts = task.loss(original, soft)
    class_logits, dist_logits = task(original)
    expected_base = (-soft * F.log_softmax(class_logits, -1)).sum(-1).mean()
    expected_distill = F.cross_entropy(dist_logits, task.teacher(original).argmax(-1))
    torch.testing.assert_close(parts["base_loss"], expected_base)
    torch.testing.assert_close(loss, 0.5 * expected_base + 0.5 * expected_distill)


def test_evaluation_averages_the_two_heads_and_training_returns_both():
    task = _task("hard")
    images = torch.randn(3, 3, 32, 32)
    task.eval()
    with torch.no_grad():
        tokens = task.model.forward_features(images)
        average = (task.model.head(tokens[:, 0]) + task.model.head_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(task(images), average)
    task.train()
    class_logits, dist_logits = task(images)
    assert class_logits.shape == dist_logits.shape == (3, 5) and not torch.allclose(class_logits, dist_logits)
    # distillation none: timm's distilled model trains on the averaged heads
    plain = _task("none")
    plain.train()
    assert plain(images).shape == (3, 5)


def _data(tmp_path):
    return GeneratedDataModule(mode="finetune", num_train=32, num_val=16, num_classes=5, image_size=32, input_size=32,
                               patch_size=8, batch_size=16, num_workers=0, scale=(0.6, 1.0), auto_augment=None,
                               reprob=0.0, crop_pct=1.0, cache_dir=str(tmp_path), samples_per_shard=16)


def test_teacher_stays_frozen_in_eval_mode_and_out_of_checkpoints(tmp_path):
    task = _task("soft", ema_decay=0.9)
    teacher_before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in task.model.state_dict().items()}
    task.train()
    assert not task.teacher.training and task.model.training
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, _data(tmp_path))
    assert all(torch.equal(teacher_before[k], v) for k, v in task.teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert not all(torch.equal(student_before[k], v) for k, v in task.model.state_dict().items())
    metrics = trainer.callback_metrics
    assert {"train/base_loss", "train/distillation_loss", "val/acc1", "val/teacher_agreement", "val/ema_acc1"} <= set(metrics)
    assert 0.0 <= float(metrics["val/teacher_agreement"]) <= 1.0
    path = tmp_path / "distilled.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith("teacher.")] and any(k.startswith("model.head_dist.") for k in state)
    restored = ImageClassification.load_from_checkpoint(path, model=_student(), teacher=_teacher())
    torch.testing.assert_close(restored.model.head_dist.weight, task.model.head_dist.weight)


def test_teacher_agreement_is_the_fraction_of_equal_argmax_classes():
    task = _task("hard")
    task.eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.zeros(6, dtype=torch.long)
    task.log = lambda *a, **k: None
    task.validation_step({"image": images, "label": labels}, 0)
    with torch.no_grad():
        expected = (task(images).argmax(-1) == task.teacher(images).argmax(-1)).float().mean()
    torch.testing.assert_close(task.teacher_agreement.compute(), expected)


def test_teacher_runs_in_float32_outside_autocast_unless_asked():
    task = _task("hard")
    images = torch.randn(2, 3, 32, 32)
    dtypes = []
    task.teacher.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        task.teacher_logits(images)
        task.hparams.teacher_autocast = True
        task.teacher_logits(images)
    assert dtypes == [torch.float32, torch.bfloat16]


def test_configuration_mistakes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="deit_base_distilled"):
        ImageClassification(_teacher(), 5, distillation="hard", teacher=_teacher())
    with pytest.raises(ValueError, match="needs a teacher"):
        ImageClassification(_student(), 5, distillation="soft")
    with pytest.raises(ValueError, match="distillation='none'"):
        ImageClassification(_student(), 5, teacher=_teacher())
    with pytest.raises(ValueError, match="teacher predicts 3 classes"):
        ImageClassification(_student(), 5, distillation="hard", teacher=_teacher(3))
    with pytest.raises(ValueError, match="one of"):
        ImageClassification(_student(), 5, distillation="logits", teacher=_teacher())


def test_create_teacher_loads_official_and_lightning_checkpoints(tmp_path):
    source = _teacher()
    images = torch.randn(2, 3, 32, 32)
    torch.save({"model": source.state_dict()}, tmp_path / "official.pth")  # DeiT's regnety_160-a5fe301d.pth format
    task = ImageClassification(source, 5, ema_decay=0.9)  # a fine-tuning run with an EMA beside the model
    torch.save({"state_dict": task.state_dict()}, tmp_path / "run.ckpt")
    for path in (tmp_path / "official.pth", tmp_path / "run.ckpt"):
        teacher = create_teacher("deit_tiny_patch16_224", path, num_classes=5, img_size=32, arch=TINY)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        with torch.no_grad():
            torch.testing.assert_close(teacher(images), source(images))
    with pytest.raises(FileNotFoundError, match="run this first"):
        create_teacher("deit_tiny_patch16_224", tmp_path / "none.ckpt", 5, 32, TINY, how_to_get="run this first")
    with pytest.raises(Exception, match="head"):  # another class count: no head may start fresh in a teacher
        create_teacher("deit_tiny_patch16_224", tmp_path / "official.pth", num_classes=7, img_size=32, arch=TINY)


def test_a_non_vit_teacher_such_as_a_regnet_loads(tmp_path):
    regnet = timm.create_model("regnetx_002", num_classes=5, global_pool="avg").eval()
    torch.save({"model": regnet.state_dict()}, tmp_path / "regnet.pth")
    teacher = create_teacher("regnetx_002", tmp_path / "regnet.pth", num_classes=5, arch={"global_pool": "avg"})
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), regnet(images))


def _compose(overrides, output_dir):
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"output_dir={output_dir}"])


def test_smoke_distill_without_its_teacher_names_the_command_that_trains_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match=r"beit-lightning experiment=smoke_finetune hydra\.run\.dir=outputs/smoke_teacher"):
        train(_compose(["experiment=smoke_distill"], tmp_path / "run"))


def test_official_recipe_composes_with_a_regnet_teacher():
    cfg = _compose(["experiment=deit_base_distilled_in1k", "task.teacher.checkpoint=/ckpt/regnety_160-a5fe301d.pth",
                    "data.train_urls=/x"], "/tmp/x")
    assert (cfg.task.distillation, cfg.task.distillation_alpha, cfg.task.teacher.model_name) == ("hard", 0.5, "regnety_160")
    with torch.device("meta"):
        teacher = timm.create_model(cfg.task.teacher.model_name, num_classes=cfg.task.num_classes, **cfg.task.teacher.arch)
    assert 83e6 < sum(p.numel() for p in teacher.parameters()) < 84e6  # RegNetY-16GF


@pytest.mark.slow
def test_smoke_distill_trains_a_teacher_then_a_student_through_the_app(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["data.num_train=64", "data.num_val=32", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=csv",
             "trainer.log_every_n_steps=1"]
    train(_compose(["experiment=smoke_finetune", *small], tmp_path / "outputs" / "smoke_teacher"))
    assert os.path.isfile("outputs/smoke_teacher/checkpoints/last.ckpt")  # where smoke_distill looks by default
    acc = train(_compose(["experiment=smoke_distill", *small], tmp_path / "student"))
    csv = tmp_path / "student" / "csv" / "metrics.csv"
    assert acc == pytest.approx(last_logged(csv, "val/acc1"))
    assert 0.0 <= last_logged(csv, "val/teacher_agreement") <= 1.0
    assert last_logged(csv, "train/distillation_loss") > 0
