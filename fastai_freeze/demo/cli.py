"""The command line: `python -m fastai_freeze demo|compare`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "folder_dls_factory", "torchvision_learner_factory", "cached_weights_path"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class CLIError(ValueError):
    "A user error, printed as one line (no traceback)."


def _images(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()]


def folder_dls_factory(path: str | Path, size: int = 128, valid_pct: float = 0.2):
    """Check an image folder and return `make_dls(bs, seed)` over it with fastai's `from_folder`.

    Layouts: `path/train/<class>/*` with `path/valid/<class>/*` (or `val`), or `path/<class>/*`
    (20% held out at random). Raises `CLIError` for a missing path, no images, or fewer than two classes.
    """
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{path}: no such folder")
    if not path.is_dir():
        raise CLIError(f"{path}: not a folder (give a folder of class sub-folders)")
    valid_name = next((v for v in ("valid", "val") if (path / v).is_dir()), None)
    train_root = path / "train" if (path / "train").is_dir() and valid_name else path
    imgs = _images(train_root)
    if not imgs:
        raise CLIError(f"{path}: no image files ({', '.join(sorted(IMAGE_EXTS))}) found")
    classes = sorted({p.parent.name for p in imgs if p.parent != train_root})
    if len(classes) < 2:
        found = f"one class ({classes[0]!r})" if classes else "no class folders"
        raise CLIError(f"{path}: found {found}; a classifier needs images in at least two class "
                       f"sub-folders, e.g. {path}/cats/*.jpg and {path}/dogs/*.jpg")

    def make(bs: int, seed: int):
        from fastai.vision.all import ImageDataLoaders, Resize
        kw = dict(item_tfms=Resize(size), bs=bs, seed=seed)
        if valid_name:
            return ImageDataLoaders.from_folder(path, train="train", valid=valid_name, **kw)
        return ImageDataLoaders.from_folder(path, valid_pct=valid_pct, **kw)
    make.classes = classes
    make.n_images = len(imgs)
    return make


def cached_weights_path(arch: str) -> Path:
    "Where torchvision keeps the default pretrained weights of `arch` in the local torch cache."
    import torch
    import torchvision
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError) as e:
        names = ", ".join(sorted(torchvision.models.list_models(torchvision.models))[:12])
        raise CLIError(f"unknown torchvision architecture {arch!r} (e.g. {names}, ...)") from e
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def torchvision_learner_factory(arch: str, pretrained: bool = True):
    """`make_learner(dls, pretrained)` with fastai's `vision_learner` on a torchvision architecture.

    Pretrained weights come from the local torch cache only; when they are missing, `CLIError` says
    where they are expected and how to proceed.
    """
    import torchvision
    from fastai.metrics import accuracy
    from fastai.vision.learner import vision_learner
    fn = torchvision.models.get_model_builder(arch) if arch in torchvision.models.list_models() else None
    if fn is None:
        cached_weights_path(arch)  # raises the message with the known names
    if pretrained:
        p = cached_weights_path(arch)
        if not p.exists():
            raise CLIError(f"pretrained weights for {arch} are not in the local torch cache ({p}). Download "
                           f"them once where there is network (e.g. torchvision.models.{arch}(weights='DEFAULT')), "
                           f"copy the file there, or run with --no-pretrained to compare from random weights")

    def make(dls, use_pretrained: bool):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return vision_learner(dls, fn, pretrained=pretrained and use_pretrained, metrics=accuracy)
    return make


def _strategies(text: str | None):
    from ..strategies import STRATEGIES
    if not text:
        return list(STRATEGIES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES]
    if bad:
        raise CLIError(f"unknown strategies {bad}: choose from {', '.join(STRATEGIES)}")
    return names


def _positive(name):
    def check(v):
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {v!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {n}")
        return n
    return check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastai_freeze",
                                description="Compare fine-tuning strategies (BN policies, schedules).")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the strategy comparison on the embedded default data (no download)")
    d.add_argument("--quick", action="store_true", help="a short version: 1 seed, fewer runs (under 3 minutes)")
    d.add_argument("--seeds", type=_positive("--seeds"), default=3)
    d.add_argument("--epochs", type=_positive("--epochs"), default=4, help="unfrozen epochs (plus 1 warm-up)")
    d.add_argument("--strategies", help="comma-separated names (default: all)")
    d.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the plots and the table")
    c = sub.add_parser("compare", help="the strategy comparison on your own image folder")
    c.add_argument("path", type=Path)
    c.add_argument("--arch", default="resnet18", help="a torchvision architecture name (default resnet18)")
    c.add_argument("--no-pretrained", action="store_true", help="random weights (no weights in the cache)")
    c.add_argument("--epochs", type=_positive("--epochs"), default=4)
    c.add_argument("--bs", type=_positive("--bs"), action="append", help="batch size (repeatable; default 64)")
    c.add_argument("--size", type=_positive("--size"), default=128, help="image side after resizing")
    c.add_argument("--strategies", help="comma-separated names (default: all)")
    c.add_argument("--seeds", type=_positive("--seeds"), default=3)
    c.add_argument("--out", type=Path, default=Path("compare_out"))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _write_table(rows, out: Path, title: str) -> None:
    from .comparison import format_table
    table = format_table(rows)
    print(f"\n{title}\n\n{table}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"# {title}\n\n{table}\n")
    print(f"wrote {out / 'table.md'}")


def _run(args) -> int:
    import torch
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    from .comparison import SCENARIOS, compare, compare_runs, plot_results
    strategies = _strategies(args.strategies)
    if args.cmd == "demo":
        if args.quick:
            scen = ["similar-small", "different-small"]
            rows = compare(scen, strategies, seeds=1, epochs=2, batch_sizes=None, out=args.out)
        else:
            rows = compare(list(SCENARIOS), strategies, seeds=args.seeds, epochs=args.epochs, out=args.out)
        _write_table(rows, args.out, "Strategy comparison on the embedded default "
                     "(validation accuracy, mean ± std over seeds, seconds per run)")
        return 0
    make_dls = folder_dls_factory(args.path, args.size)
    make_learner = torchvision_learner_factory(args.arch, not args.no_pretrained)
    print(f"{args.path}: {make_dls.n_images} images in {len(make_dls.classes)} classes; arch {args.arch}")
    records = {}
    rows = compare_runs(args.path.name, make_dls, make_learner, args.bs or [64], strategies, args.seeds,
                        args.epochs, records=records)
    plot_results(rows, records, args.out)
    _write_table(rows, args.out, f"Strategy comparison on {args.path}")
    return 0
