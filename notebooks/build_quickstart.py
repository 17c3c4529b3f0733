"""Write and execute notebooks/quickstart.ipynb (run: python notebooks/build_quickstart.py).

Needs the `notebooks` extra: pip install -e '.[notebooks]'.
"""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent

cells = [
    ("md", "# beit-lightning quickstart\n\nBEiT pre-training in a few lines, on the embedded generated data "
           "and a micro model, on CPU. Each image gives two views (patches for the backbone, a smaller view for "
           "the tokenizer) and a blockwise mask; the model predicts the tokenizer's codes at the masked patches."),
    ("code", "import torch, pytorch_lightning as pl\nimport matplotlib.pyplot as plt\n"
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
             "trainer = pl.Trainer(accelerator='cpu', max_epochs=3, logger=pl.loggers.CSVLogger('/tmp/quickstart'),\n"
             "                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=2,\n"
             "                     gradient_clip_val=3.0)\n"
             "trainer.fit(task, dm)\n{k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}"),
    ("code", "import pandas as pd\nm = pd.read_csv(f'{trainer.logger.log_dir}/metrics.csv')\n"
             "ax = m.dropna(subset=['train/loss']).plot(x='step', y='train/loss', figsize=(5, 3))\n"
             "ax.set_ylabel('cross-entropy at masked patches')"),
    ("md", "With the untrained tokenizer most patches fall into a few codes, so the loss drops fast and "
           "`mlm_acc` is high: a pipeline check, not a result. The same task with OpenAI's tokenizer (or a "
           "tokenizer trained on your data) is BEiT pre-training."),
]

nb = nbformat.v4.new_notebook()
nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src) for kind, src in cells]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
nbformat.write(nb, HERE / "quickstart.ipynb")
print("wrote", HERE / "quickstart.ipynb")
