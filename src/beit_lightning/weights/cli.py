"""Console scripts of the weights package.

``beit-lightning-weights list [PATTERN] | info NAME | download NAME [--to DIR]``: see and prefetch the
registry's files (on a login node with network, for compute nodes without); ``beit-lightning-export``:
any BEiT checkpoint to timm's format, or one of our runs' checkpoints to a transformers folder.
"""

from __future__ import annotations

import argparse
import os

from .download import cache_dir, download_url, url_cache_path
from .hf_export import export_hf_checkpoint
from .registry import get_entry, list_entries
from .sources import resolve_weights, source_kind
from .timm_export import export_timm

__all__ = ["export_main", "weights_main"]


def _cached(url: str, root: str | None = None) -> bool:
    return os.path.isfile(url_cache_path(url, root))


def weights_main(argv: list[str] | None = None) -> int:
    """``beit-lightning-weights``: list, describe and download the registry's weights."""
    parser = argparse.ArgumentParser(
        prog="beit-lightning-weights",
        description="The published BEiT-family weights by name: list them, describe one, or download one into the cache "
        f"($BEIT_LIGHTNING_CACHE, now {cache_dir()}) so that runs without network find it. Every name also works as "
        "init_checkpoint=, tokenizer.path=, task.teacher.checkpoint= or task.inception_weights=.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="the registry's names (with a pattern: those that contain it)")
    listing.add_argument("pattern", nargs="?", default="")
    info = sub.add_parser("info", help="everything the registry knows of one name, and whether it is cached")
    info.add_argument("name")
    fetch = sub.add_parser("download", help="download a registry name, URL, hf-hub:<repo> or timm:<model>")
    fetch.add_argument("name")
    fetch.add_argument("--to", default=None, help="a cache folder to fill instead of $BEIT_LIGHTNING_CACHE (then set "
                       "BEIT_LIGHTNING_CACHE to it where the runs are); hf-hub: and timm: names use the Hugging Face cache")
    args = parser.parse_args(argv)
    if args.command == "list":
        entries = list_entries(args.pattern)
        width = max((len(e.name) for e in entries), default=4)
        print(f"{'name':<{width}}  {'format':<21}  {'model':<12}  {'px':>4}  {'classes':>7}  cached")
        for e in entries:
            print(f"{e.name:<{width}}  {e.format:<21}  {e.model or '-':<12}  {e.resolution or '-':>4}  "
                  f"{e.num_classes if e.num_classes is not None else '-':>7}  {'yes' if _cached(e.url) else 'no'}")
        return 0
    if args.command == "info":
        entry = get_entry(args.name)
        for key, value in entry.as_dict().items():
            print(f"{key + ':':<14}{value if value is not None else '-'}")
        print(f"{'cache path:':<14}{url_cache_path(entry.url)} ({'present' if _cached(entry.url) else 'absent'})")
        return 0
    kind = source_kind(args.name)
    if kind == "path":
        parser.error(f"{args.name!r} is not a registry name, URL, hf-hub:<repo> or timm:<model>")
    if args.to is not None and kind in ("url", "registry"):
        url = args.name if kind == "url" else get_entry(args.name).url
        sha256 = None if kind == "url" else get_entry(args.name).sha256
        path = download_url(url, sha256=sha256, dest=url_cache_path(url, args.to))
        print(f"{path}\n(set BEIT_LIGHTNING_CACHE={os.path.abspath(args.to)} where the runs should find it)")
        return 0
    print(resolve_weights(args.name))
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """``beit-lightning-export CHECKPOINT OUT --model NAME``: any BEiT checkpoint to a timm file;
    ``beit-lightning-export --format hf CHECKPOINT FOLDER``: one of our run's checkpoints to a
    transformers ``save_pretrained`` folder with image processor and model card."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="beit-lightning-export",
        description="Turn a BEiT checkpoint (ours, the official release, timm, transformers) into a state dict that "
        "timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=OUT)) loads (--format timm, the "
        "default), or one of our Lightning checkpoints into a transformers save_pretrained folder (--format hf: "
        "config.json, model.safetensors, preprocessor_config.json, README.md).",
    )
    parser.add_argument("checkpoint", help="a file, folder, URL, hf-hub:<repo>, timm:<model> or registry name")
    parser.add_argument("out", help="timm: output file (.safetensors or .pth); hf: output folder")
    parser.add_argument("--format", choices=("timm", "hf"), default="timm", help="default: timm")
    parser.add_argument("--model", default=None, help="timm: timm model name, e.g. beit_base_patch16_224 (required)")
    parser.add_argument("--num-classes", type=int, default=None, help="timm: default: the checkpoint's head, else 0")
    parser.add_argument("--img-size", type=int, default=None, help="timm: default: the timm model's")
    parser.add_argument("--config", default=None,
                        help="hf: the run's config_resolved.yaml (default: the one in the checkpoint's run folder)")
    parser.add_argument("--no-pad", dest="pad_last_block", action="store_false",
                        help="hf: refuse a segmentation model that uses its last block instead of appending an identity "
                        "layer (transformers' out_indices cannot select the last block)")
    parser.add_argument("--ema", action="store_true",
                        help="hf: export the EMA of the weights of a run with task.ema_decay (default: the trained weights)")
    args = parser.parse_args(argv)
    from ..models.timm_sizes import TIMM_SIZES  # noqa: F401 - registers our model sizes with timm

    if args.format == "hf":
        if args.model or args.num_classes is not None or args.img_size:
            parser.error("--model, --num-classes and --img-size are timm options: with --format hf the network comes "
                         "from the run's configuration (--config)")
        folder = export_hf_checkpoint(args.checkpoint, args.out, config=args.config, pad_last_block=args.pad_last_block,
                                      ema=args.ema)
        print(f"wrote a transformers folder (config.json, model.safetensors, preprocessor_config.json, README.md) to {folder}")
        return 0
    if args.model is None:
        parser.error("--model is required with --format timm (e.g. --model beit_base_patch16_224)")
    state = export_timm(args.checkpoint, args.out, args.model, args.num_classes, args.img_size)
    print(f"wrote {len(state)} tensors for timm's {args.model} to {args.out}")
    return 0
