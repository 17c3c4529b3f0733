"""Write and execute the notebooks (run: python notebooks/build.py [name ...]).

The notebooks are generated from the cells below so that they stay short and reviewable as code;
their executed outputs are committed (they read on GitHub), and tests/test_notebooks.py executes
them again. Needs the `dev` extra (nbformat, nbclient, ipykernel, matplotlib).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent

QUICKSTART = [
    ("md", "# beit-lightning quickstart\n\nBEiT pre-training in a few lines, on the embedded generated data "
           "and a micro model, on CPU. Each image gives two views (patches for the backbone, a smaller view for "
           "the tokenizer) and a blockwise mask; the model predicts the tokenizer's codes at the masked patches."),
    ("code", "import csv\nimport torch, pytorch_lightning as pl\nimport matplotlib.pyplot as plt\n"
             "from beit_lightning import BeitForMaskedImageModeling, DallETokenizer, GeneratedDataModule, MaskedImageModeling\n"
             "pl.seed_everything(0)"),
    ("md", "## Data: two views and a blockwise mask\n\n64px images, 8px patches (an 8x8 grid), 26 of 64 patches masked in blocks."),
    ("code", "dm = GeneratedDataModule(num_train=256, num_val=64, image_size=64, input_size=64, tokenizer_size=64,\n"
             "                         patch_size=8, num_masking_patches=26, min_num_patches=4, batch_size=32, num_workers=0)\n"
             "dm.setup()\nbatch = next(iter(dm.train_dataloader()))\n{k: (tuple(v.shape), v.dtype) for k, v in batch.items()}"),
    ("code", "fig, axes = plt.subplots(3, 6, figsize=(12, 6))\n"
             "for i in range(6):\n"
             "    img = (batch['image'][i] * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0)\n"
             "    axes[0, i].imshow(img); axes[1, i].imshow(batch['tokenizer_image'][i].permute(1, 2, 0))\n"
             "    axes[2, i].imshow(batch['mask'][i], cmap='gray')\n"
             "for ax, title in zip(axes[:, 0], ['patch view', 'tokenizer view', 'mask']):\n"
             "    ax.set_ylabel(title)\n"
             "for ax in axes.flat:\n    ax.set_xticks([]); ax.set_yticks([])\nplt.tight_layout()"),
    ("md", "## Model and tokenizer\n\n`model.backbone` is a plain timm `Beit`. The tokenizer here is the DALL-E encoder "
           "architecture with seeded random weights (no download); load OpenAI's weights with "
           "`DallETokenizer.from_openai('encoder.pkl')` for real work."),
    ("code", "model = BeitForMaskedImageModeling('beit_lightning_micro_patch8_32', vocab_size=512, img_size=64)\n"
             "tokenizer = DallETokenizer(n_hid=32, n_blk_per_group=1, vocab_size=512, image_size=64, seed=0)\n"
             "tokens = tokenizer.encode(batch['tokenizer_image'])\n"
             "print(type(model.backbone).__module__, type(model.backbone).__name__)\n"
             "print('tokens', tuple(tokens.shape), 'distinct codes in this batch:', tokens.unique().numel())\n"
             "logits = model(batch['image'], batch['mask'])\nprint('logits at masked patches:', tuple(logits.shape))"),
    ("md", "## Pre-train for a few epochs"),
    ("code", "task = MaskedImageModeling(model, tokenizer, lr=1e-3, warmup_steps=8)\n"
             "trainer = pl.Trainer(accelerator='cpu', max_epochs=3, logger=pl.loggers.CSVLogger('outputs/quickstart'),\n"
             "                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=2,\n"
             "                     gradient_clip_val=3.0)\n"
             "trainer.fit(task, dm)\n{k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}"),
    ("code", "rows = [r for r in csv.DictReader(open(f'{trainer.logger.log_dir}/metrics.csv')) if r.get('train/loss')]\n"
             "plt.figure(figsize=(5, 3))\nplt.plot([int(r['step']) for r in rows], [float(r['train/loss']) for r in rows])\n"
             "plt.xlabel('step'); plt.ylabel('cross-entropy at masked patches')"),
    ("md", "With the untrained tokenizer most patches fall into a few codes, so the loss drops fast and "
           "`mlm_acc` is high: a pipeline check, not a result. The same task with OpenAI's tokenizer (or a "
           "tokenizer trained on your data, see the `visualise` notebook) is BEiT pre-training."),
]

VISUALISE = [
    ("md", "# What BEiT learns\n\nA tokenizer trained here (a small dVAE), a short pre-training against it, then the "
           "checkpoint loaded back and looked at: masks, the tokenizer's token maps, the model's predicted tokens, the "
           "images decoded from both, the CLS token's attention, and a linear probe of every block. Generated data, "
           "micro models, CPU; a few minutes. The same pictures are logged during training by "
           "`beit_lightning.callbacks.ValidationImages`."),
    ("code", "import csv\nimport torch, pytorch_lightning as pl\nimport matplotlib.pyplot as plt\n"
             "from beit_lightning import (BeitForMaskedImageModeling, DiscreteVAE, GeneratedDataModule, LinearProbe,\n"
             "                            MaskedImageModeling, TokenizerTraining, load_checkpoint, visualise)\n"
             "from beit_lightning.models import create_classifier\n"
             "pl.seed_everything(0)\n"
             "quiet = dict(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,\n"
             "             enable_model_summary=False)\n"
             "def show(images, titles, size=2.2):\n"
             "    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size))\n"
             "    for ax, image, title in zip(axes, images, titles):\n"
             "        ax.imshow(image); ax.set_title(title, fontsize=9); ax.axis('off')\n"
             "    plt.tight_layout(); plt.show()"),
    ("md", "## 1. A tokenizer: a dVAE with 64 codes on a 48px view (a 6x6 grid of tokens)"),
    ("code", "tok_data = GeneratedDataModule(mode='tokenizer', num_train=2048, num_val=64, image_size=64, tokenizer_size=48,\n"
             "                               input_size=48, patch_size=8, batch_size=16, num_workers=0, scale=(0.5, 1.0))\n"
             "dvae = DiscreteVAE(vocab_size=64, image_size=48, n_hid=12, n_blk_per_group=1, n_init=12,\n"
             "                   tau_anneal_steps=200, kl_warmup_steps=60)\n"
             "pl.Trainer(max_steps=200, **quiet).fit(TokenizerTraining(dvae, lr=3e-3, warmup_steps=20, export_path=None), tok_data)\n"
             "dvae.eval();"),
    ("md", "## 2. Pre-train a micro BEiT against it, and save the checkpoint"),
    ("code", "data = GeneratedDataModule(num_train=1024, num_val=64, image_size=64, input_size=48, tokenizer_size=48, patch_size=8,\n"
             "                          num_masking_patches=14, min_num_patches=4, batch_size=32, num_workers=0, mean=(0.5,) * 3,\n"
             "                          std=(0.5,) * 3)\n"
             "mim = MaskedImageModeling(BeitForMaskedImageModeling('beit_lightning_micro_patch8_32', vocab_size=64, img_size=48),\n"
             "                          dvae, lr=2e-3, warmup_steps=10)\n"
             "trainer = pl.Trainer(max_epochs=4, gradient_clip_val=3.0, **quiet)\ntrainer.fit(mim, data)\n"
             "trainer.save_checkpoint('outputs/visualise/mim.ckpt')\n"
             "{k: round(float(v), 3) for k, v in trainer.callback_metrics.items()}"),
    ("md", "## 3. Load the checkpoint into a fresh model"),
    ("code", "model = BeitForMaskedImageModeling('beit_lightning_micro_patch8_32', vocab_size=64, img_size=48)\n"
             "print(load_checkpoint(model, 'outputs/visualise/mim.ckpt').report())\nmodel.eval();"),
    ("md", "## 4. Masks, token maps, predicted tokens and decoded images\n\nPer image: the masked input, the tokenizer's "
           "tokens (one colour per code), the model's predictions at the masked patches, and the dVAE's decoding of the "
           "target tokens and of the tokens with the masked ones replaced by the predictions."),
    ("code", "data.setup()\nbatch = next(iter(data.val_dataloader()))\ncolours = visualise.token_colours(64)\n"
             "with torch.no_grad():\n"
             "    targets = dvae.encode(batch['tokenizer_image'])\n"
             "    predicted = model(batch['image'], batch['mask']).argmax(-1)\n"
             "offset = 0\n"
             "for i in range(3):\n"
             "    mask = batch['mask'][i]; n = int(mask.sum())\n"
             "    filled = targets[i].clone(); filled[mask] = predicted[offset:offset + n]\n"
             "    acc = float((predicted[offset:offset + n] == targets[i][mask]).float().mean()); offset += n\n"
             "    picture = visualise.to_uint8(batch['image'][i], (0.5,) * 3, (0.5,) * 3)\n"
             "    with torch.no_grad():\n"
             "        decoded = dvae.decode(torch.stack([targets[i], filled]))\n"
             "    show([visualise.masked_image(picture, mask), visualise.colour_map(targets[i], colours, (48, 48)),\n"
             "          visualise.colour_map(filled, colours, (48, 48)), decoded[0].permute(1, 2, 0).clamp(0, 1),\n"
             "          decoded[1].permute(1, 2, 0).clamp(0, 1)],\n"
             "         ['masked input', 'target tokens', f'predicted (acc {acc:.2f})', 'decoded targets', 'decoded prediction'])"),
    ("md", "## 5. Attention of the CLS token in the last block, per head and averaged"),
    ("code", "maps = visualise.attention_maps(model.backbone, batch['image'][:3])\n"
             "for i in range(3):\n"
             "    picture = visualise.to_uint8(batch['image'][i], (0.5,) * 3, (0.5,) * 3)\n"
             "    show([picture, visualise.heatmap(maps[i].mean(0), (48, 48))] + [visualise.heatmap(m, (48, 48)) for m in maps[i]],\n"
             "         ['image', 'mean'] + [f'head {h}' for h in range(len(maps[i]))])"),
    ("md", "## 6. A linear probe of every block\n\nThe official probe: a plain linear head per block on concat(CLS, mean "
           "patch token) of the frozen encoder."),
    ("code", "probe_data = GeneratedDataModule(mode='finetune', num_train=1024, num_val=256, image_size=64, input_size=48,\n"
             "                                 patch_size=8, batch_size=64, num_workers=0, auto_augment=None, reprob=0.0,\n"
             "                                 color_jitter=0.0, scale=(0.5, 1.0), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)\n"
             "encoder = create_classifier('beit_lightning_micro_patch8_32', num_classes=0, img_size=48,\n"
             "                            arch=dict(use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1))\n"
             "load_checkpoint(encoder, 'outputs/visualise/mim.ckpt')\n"
             "probe = LinearProbe(encoder, num_classes=10, lr=1e-2, lr_base_batch=None)\n"
             "pl.Trainer(max_epochs=3, **quiet).fit(probe, probe_data)\n"
             "trainer_metrics = pl.Trainer(**quiet).validate(probe, probe_data, verbose=False)[0]\n"
             "accs = [trainer_metrics[f'val/acc1_block{b}'] for b in probe.blocks]\n"
             "plt.figure(figsize=(4, 3)); plt.bar([str(b) for b in probe.blocks], accs)\n"
             "plt.xlabel('block'); plt.ylabel('linear-probe accuracy'); plt.ylim(0, 1); plt.show()"),
]

SEGMENTATION = [
    ("md", "# Semantic segmentation: BEiT + UperNet\n\n`BeitUperNet` (four scales from BEiT blocks, a UperNet decoder, "
           "an auxiliary FCN head) trained by `SemanticSegmentation` on the embedded generated segmentation data "
           "(textured regions whose texture, not colour, gives the class), then evaluated by sliding windows as on "
           "ADE20K. CPU, about a minute."),
    ("code", "import torch, pytorch_lightning as pl\nimport matplotlib.pyplot as plt\nimport matplotlib.patches as patches\n"
             "from beit_lightning import BeitUperNet, SemanticSegmentation, visualise\n"
             "from beit_lightning.data import ADE20KDataModule, GeneratedSegmentationDataModule\n"
             "from beit_lightning.tasks.segmentation import _window_starts, scores_from_confusion\n"
             "pl.seed_everything(0)"),
    ("md", "## Data: images and label maps (0 = ignored boundary band, then background and six textures)"),
    ("code", "dm = GeneratedSegmentationDataModule(num_train=512, num_val=32, image_size=64, crop_size=64, batch_size=16,\n"
             "                                     num_workers=0)\ndm.setup()\nbatch = next(iter(dm.train_dataloader()))\n"
             "palette = visualise.class_palette(dm.num_classes)\n"
             "fig, axes = plt.subplots(2, 6, figsize=(12, 4))\n"
             "for i in range(6):\n"
             "    axes[0, i].imshow(visualise.to_uint8(batch['image'][i], dm.mean, dm.std))\n"
             "    axes[1, i].imshow(visualise.colour_map(batch['label'][i], palette))\n"
             "for ax in axes.flat: ax.axis('off')\nprint(dm.classes)"),
    ("md", "## Train (10 epochs of the `smoke_segmentation` recipe)"),
    ("code", "model = BeitUperNet('beit_lightning_micro_patch8_32', num_classes=dm.num_classes, img_size=64, out_indices=(0, 1, 2, 3),\n"
             "                    channels=64, aux_channels=32, depth=4, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)\n"
             "task = SemanticSegmentation(model, num_classes=dm.num_classes, lr=3e-3, layer_decay=0.9, warmup_steps=10,\n"
             "                            crop_size=64, stride=43, class_names=dm.classes)\n"
             "trainer = pl.Trainer(accelerator='cpu', max_epochs=10, logger=False, enable_checkpointing=False,\n"
             "                     enable_progress_bar=False, enable_model_summary=False)\ntrainer.fit(task, dm)\n"
             "{k: round(float(v), 3) for k, v in trainer.callback_metrics.items() if k.startswith('val/')}"),
    ("md", "## Predictions beside the ground truth, and the per-class table"),
    ("code", "task.eval()\nfig, axes = plt.subplots(4, 3, figsize=(6, 8))\nconfusion = torch.zeros(dm.num_classes, dm.num_classes)\n"
             "for i, sample in zip(range(4), dm.val_dataloader()):\n"
             "    with torch.no_grad():\n        pred = task.predict_logits(sample['image'], size=sample['label'].shape[-2:]).argmax(1)[0]\n"
             "    label = sample['label'][0]\n"
             "    axes[i, 0].imshow(visualise.to_uint8(torch.nn.functional.interpolate(sample['image'], size=label.shape)[0], dm.mean, dm.std))\n"
             "    axes[i, 1].imshow(visualise.colour_map(label, palette)); axes[i, 2].imshow(visualise.colour_map(pred, palette))\n"
             "for ax, title in zip(axes[0], ['image', 'ground truth', 'prediction']): ax.set_title(title)\n"
             "for ax in axes.flat: ax.axis('off')\nplt.tight_layout(); plt.show()\n"
             "metrics = trainer.validate(task, dm, verbose=False)[0]\nprint({k: round(v, 3) for k, v in metrics.items()})"),
    ("md", "## Sliding windows on a real ADE20K image\n\nEvaluation resizes an image so that its short side is the crop "
           "(512 on ADE20K) and covers it with crop-sized windows every `stride` pixels (341); the logits of "
           "overlapping windows are averaged. One of the three real validation images of the test fixtures:"),
    ("code", "from PIL import Image\nimage = Image.open('../tests/fixtures/ade20k/images/validation/ADE_val_00000001.jpg')\n"
             "w, h = image.size; scale = 512 / min(w, h); w, h = round(w * scale), round(h * scale)\n"
             "fig, ax = plt.subplots(figsize=(7, 5)); ax.imshow(image.resize((w, h)))\n"
             "for top in _window_starts(h, 512, 341):\n"
             "    for left in _window_starts(w, 512, 341):\n"
             "        ax.add_patch(patches.Rectangle((left, top), 512, 512, fill=False, lw=2, color='yellow'))\n"
             "ax.set_title(f'{w}x{h}: {len(_window_starts(h, 512, 341)) * len(_window_starts(w, 512, 341))} windows'); ax.axis('off');"),
]

NOTEBOOKS = {"quickstart": QUICKSTART, "visualise": VISUALISE, "segmentation": SEGMENTATION}


def build(name: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in NOTEBOOKS[name]]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    for name in sys.argv[1:] or NOTEBOOKS:
        print("wrote", build(name))
