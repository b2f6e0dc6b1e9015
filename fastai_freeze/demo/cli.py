"""The command line: `python -m fastai_freeze demo|compare`.

Every user error is found before any training and printed as one line (`error: ...`), exit code 2.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "CLIError", "check_folder", "FolderTask", "learner_factory", "cached_weights_path"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DEFAULT_ARCH = "tf_efficientnet_lite0"
QUICK_STRATEGIES = ("fine_tune", "bn_frozen", "bn_fold", "fine_tune_with", "features")


class CLIError(ValueError):
    "A user error, printed as one line (no traceback)."


def _images(path: Path) -> list[Path]:
    "The image files under `path`, skipping dot-files and dot-folders as fastai's `get_image_files` does."
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def _classes(root: Path, imgs: list[Path]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in imgs:
        if p.parent != root:
            out[p.parent.name] = out.get(p.parent.name, 0) + 1
    return out


@dataclass(frozen=True)
class FolderLayout:
    "What `check_folder` found: the split, the classes and how many training images there are."
    path: Path
    valid_name: str | None
    classes: list[str]
    n_images: int
    n_train: int


def check_folder(path: str | Path, valid_pct: float = 0.2) -> FolderLayout:
    """Check an image folder before anything is trained; raise `CLIError` saying what is wrong.

    Layouts: `path/train/<class>/*` with `path/valid/<class>/*` (or `val`), or `path/<class>/*`
    (`valid_pct` held out at random). Every image is opened once (a corrupt file is named).
    """
    from PIL import Image, UnidentifiedImageError
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
    train_classes = _classes(train_root, imgs)
    if len(train_classes) < 2:
        found = f"one class ({next(iter(train_classes))!r})" if train_classes else "no class folders"
        raise CLIError(f"{path}: found {found}; a classifier needs images in at least two class "
                       f"sub-folders, e.g. {path}/cats/*.jpg and {path}/dogs/*.jpg")
    n_train = int(len(imgs) * (1 - valid_pct))
    if valid_name:
        vimgs = _images(path / valid_name)
        if not vimgs:
            raise CLIError(f"{path / valid_name}: the validation folder holds no image files")
        extra = sorted(set(_classes(path / valid_name, vimgs)) - set(train_classes))
        if extra:
            raise CLIError(f"{path / valid_name}: class(es) {extra} have validation images but no training images "
                           f"in {train_root}")
        n_train = len(imgs)
        imgs = imgs + vimgs
    for p in imgs:
        try:
            with Image.open(p) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise CLIError(f"{p}: not a readable image ({type(e).__name__}); remove or replace it") from None
    return FolderLayout(path, valid_name, sorted(train_classes), len(imgs), n_train)


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


def _is_timm(arch: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(arch)


def _checked_state_dict(weights: Path, model) -> dict:
    import torch
    if not weights.is_file():
        raise CLIError(f"{weights}: no such weights file")
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the user's file being wrong
        raise CLIError(f"{weights}: not a PyTorch state dict ({type(e).__name__})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise CLIError(f"{weights}: holds a {type(sd).__name__}, not a state dict")
    ref = model.state_dict()
    bad = [k for k, v in sd.items() if k in ref and tuple(v.shape) != tuple(ref[k].shape)]
    # the network's final classifier may be missing: vision_learner replaces it with a new head
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    head = {n for n, t in model.state_dict(keep_vars=True).items() if any(t is q for m in last for q in m.parameters())}
    missing = [k for k in ref if k not in sd and k not in head and not k.endswith("num_batches_tracked")]
    if bad or missing:
        what = (f"{len(missing)} of its {len(ref)} tensors are missing (e.g. {missing[0]})" if missing else
                f"{len(bad)} tensors have other shapes (e.g. {bad[0]}: {tuple(sd[bad[0]].shape)} against "
                f"{tuple(ref[bad[0]].shape)})")
        raise CLIError(f"{weights}: does not fit {type(model).__name__}: {what}; partial weights would leave "
                       "layers at random values")
    return sd


def learner_factory(arch: str = DEFAULT_ARCH, pretrained: bool = True, weights: str | Path | None = None):
    """`make_learner(dls)` with fastai's `vision_learner` for a timm or torchvision architecture.

    Weights: `weights` (a local state dict for `arch`), else the packaged ImageNet weights
    (`fastai_freeze.zoo`) for the architectures that have them, else for torchvision the local torch
    cache; nothing is downloaded. Problems raise `CLIError` before any training.
    """
    import torchvision

    from ..zoo import PACKAGED_WEIGHTS, packaged_weights
    weights = Path(weights) if weights is not None else None
    if _is_timm(arch):
        import timm
        if weights is not None:
            _checked_state_dict(weights, timm.create_model(arch, pretrained=False))
            kw = dict(arch=arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
        elif pretrained and arch in PACKAGED_WEIGHTS:
            try:
                kw = packaged_weights(arch)
            except (ImportError, OSError) as e:  # the package missing, the cache folder unwritable
                raise CLIError(str(e)) from None
        elif pretrained:
            raise CLIError(f"no local ImageNet weights for {arch}: give --weights FILE (a state dict for it), use "
                           f"one of {', '.join(PACKAGED_WEIGHTS)} (packaged weights), or --no-pretrained")
        else:
            kw = dict(arch=arch, pretrained=False)
    elif arch in torchvision.models.list_models():
        builder = torchvision.models.get_model_builder(arch)
        if weights is not None:
            sd = _checked_state_dict(weights, builder())

            def with_weights(*args, **kwargs):
                m = builder()
                m.load_state_dict(sd, strict=False)
                return m
            kw = dict(arch=with_weights, pretrained=False)
        else:
            if pretrained and not cached_weights_path(arch).exists():
                raise CLIError(f"pretrained weights for {arch} are not in the local torch cache "
                               f"({cached_weights_path(arch)}): give --weights FILE, copy the file there, use "
                               f"--arch {DEFAULT_ARCH} (packaged ImageNet weights), or --no-pretrained")
            kw = dict(arch=builder, pretrained=pretrained)
    else:
        raise CLIError(f"unknown architecture {arch!r}: a timm name (e.g. {DEFAULT_ARCH}, resnet18, efficientnet_b0) "
                       "or a torchvision one (e.g. resnet18, mobilenet_v3_small)")

    def make(dls):
        import warnings

        from fastai.metrics import accuracy
        from fastai.vision.learner import vision_learner
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return vision_learner(dls, metrics=accuracy, **kw)
    return make


@dataclass(frozen=True)
class FolderTask:
    "An image folder, rebuilt in any process: fastai's `from_folder` with a deterministic squish-resize."
    layout: FolderLayout
    size: int
    arch: str
    pretrained: bool
    weights: str | None
    num_workers: int = 0
    device: str | None = None

    @property
    def name(self) -> str:
        return self.layout.path.name

    def files(self) -> list[Path]:
        "The images `check_folder` checked, in a fixed order: those the Learner reads, no others."
        root = self.layout.path
        if self.layout.valid_name:
            return _images(root / "train") + _images(root / self.layout.valid_name)
        return _images(root)

    def learner(self, bs: int, seed: int):
        import torch
        from fastai.vision.all import (
            CategoryBlock,
            DataBlock,
            GrandparentSplitter,
            ImageBlock,
            RandomSplitter,
            Resize,
            ResizeMethod,
            parent_label,
        )
        # fastai's ImageDataLoaders.from_folder, reading the checked files (a broken link, a file
        # added since the check, is not read)
        splitter = (GrandparentSplitter(train_name="train", valid_name=self.layout.valid_name)
                    if self.layout.valid_name else RandomSplitter(0.2, seed=seed))
        files = self.files()
        block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=lambda _: files, splitter=splitter,
                          get_y=parent_label, item_tfms=Resize(self.size, method=ResizeMethod.Squish))
        dls = block.dataloaders(self.layout.path, bs=bs, num_workers=self.num_workers, device=self.device)
        torch.manual_seed(seed)
        return learner_factory(self.arch, self.pretrained, self.weights)(dls)


def _strategies(text: str | None) -> list[str]:
    from ..strategies import STRATEGIES
    if text is None:
        return list(STRATEGIES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise CLIError(f"--strategies {text!r} names no strategy: choose from {', '.join(STRATEGIES)}")
    bad = [s for s in names if s not in STRATEGIES]
    if bad:
        raise CLIError(f"unknown strategies {bad}: choose from {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def _count(name: str, minimum: int = 1):
    def check(v):
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {v!r}") from None
        if n < minimum:
            why = " (BatchNorm needs more than one sample per batch in training)" if name == "--bs" else ""
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {n}{why}")
        return n
    return check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastai_freeze",
                                description="Compare fine-tuning strategies (BN policies, schedules).")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the strategy comparison on the embedded data (no download)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--network", choices=("real", "pattern"), default="real",
                   help="real: ImageNet EfficientNet-Lite0 on Fashion-MNIST and digits (default); "
                        "pattern: the small pattern model")
    d.add_argument("--quick", action="store_true",
                   help=f"one scenario, one seed, the strategies {', '.join(QUICK_STRATEGIES)} (under 3 minutes)")
    d.add_argument("--seeds", type=_count("--seeds"), default=3, help="paired seeds per strategy")
    d.add_argument("--epochs", type=_count("--epochs"), default=2, help="unfrozen epochs (plus 1 warm-up)")
    d.add_argument("--strategies", help="comma-separated names (default: all)")
    d.add_argument("--workers", type=_count("--workers"), default=2, help="processes sharing the runs")
    d.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the plots and the table")
    gpu = _has_gpu()
    fmt = argparse.ArgumentDefaultsHelpFormatter
    c = sub.add_parser("compare", help="the strategy comparison on your own image folder", formatter_class=fmt,
                       description="Defaults are sized for the machine: " + (
                           "on this GPU every strategy, 3 seeds, 128 px" if gpu else
                           f"on a CPU {len(QUICK_STRATEGIES)} strategies, 1 seed, 64 px (a few minutes for a few "
                           "hundred images)") + ".")
    c.add_argument("path", type=Path)
    c.add_argument("--arch", default=DEFAULT_ARCH,
                   help="a timm or torchvision architecture (the default has packaged ImageNet weights)")
    c.add_argument("--weights", type=Path, help="a local state dict for --arch (no download)")
    c.add_argument("--no-pretrained", action="store_true", help="random weights")
    c.add_argument("--epochs", type=_count("--epochs"), default=3 if gpu else 2, help="unfrozen epochs (plus 1 warm-up)")
    c.add_argument("--bs", type=_count("--bs", 2), action="append",
                   help="batch size, repeatable (None: 64, or less so that an epoch has 8 batches)")
    c.add_argument("--size", type=_count("--size", 8), default=128 if gpu else 64, help="image side after a squish-resize")
    c.add_argument("--strategies", default=None if gpu else ",".join(QUICK_STRATEGIES),
                   help="comma-separated names" + (" (default: all)" if gpu else ""))
    c.add_argument("--seeds", type=_count("--seeds"), default=3 if gpu else 1, help="paired seeds per strategy")
    c.add_argument("--workers", type=_count("--workers"), default=1,
                   help="processes sharing the runs (each with cores / workers threads)")
    c.add_argument("--device", default=None, help="cpu or cuda (None: fastai's default_device())")
    c.add_argument("--out", type=Path, default=Path("compare_out"), help="folder for the plots and the table")
    return p


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def loader_workers(processes: int = 1) -> int:
    """DataLoader worker processes for image files: none on a machine with 2 cores or fewer per run
    (a worker's start-up every epoch costs more than it saves there), else up to 4 per run."""
    import os
    per_run = (os.cpu_count() or 1) // max(processes, 1)
    return 0 if per_run <= 2 else min(4, per_run - 1)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _check_out(out: Path) -> None:
    "Create the output folder now, so that a bad --out is said before any training."
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot be created ({type(e).__name__}: {e.strerror or e})") from None


def _write_table(rows, out: Path, title: str, records: dict) -> None:
    from .comparison import format_table, plot_results
    table = format_table(rows)
    print(f"\n{title}\n\n{table}\n")
    for p in plot_results(rows, records, out):
        print(f"wrote {p}")
    (out / "table.md").write_text(f"# {title}\n\n{table}\n")
    print(f"wrote {out / 'table.md'}")
    for (name, bs), rec in records.items():
        print(f"\nfine_tune_with on {name}, batch size {bs} (seed 0): {rec.bn}")


def _run(args) -> int:
    strategies = _strategies(args.strategies)
    _check_out(args.out)
    import torch
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    from .comparison import SCENARIOS, EmbeddedTask, compare
    records: dict = {}
    if args.cmd == "demo":
        names = [n for n, s in SCENARIOS.items() if s.network == args.network]
        seeds = args.seeds
        if args.quick:
            names, seeds = names[:1], 1
            strategies = strategies if args.strategies else list(QUICK_STRATEGIES)
        tasks = [EmbeddedTask(n) for n in names]
        rows = compare(tasks, strategies, seeds=seeds, epochs=args.epochs, workers=args.workers, records=records)
        _write_table(rows, args.out, f"Strategy comparison, {args.network} network (validation accuracy, mean ± std "
                     f"over {seeds} seed(s))", records)
        return 0
    layout = check_folder(args.path)
    sizes = args.bs or [max(2, min(64, 2 ** int(math.log2(max(layout.n_train // 8, 2)))))]
    too_big = [b for b in sizes if b > layout.n_train]
    if too_big:
        raise CLIError(f"--bs {too_big[0]} is larger than the {layout.n_train} training images of {args.path}")
    if args.device not in (None, "cpu", "cuda") and not str(args.device).startswith("cuda:"):
        raise CLIError(f"--device {args.device!r}: use cpu or cuda")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: no CUDA device is available here")
    task = FolderTask(layout, args.size, args.arch, not args.no_pretrained,
                      str(args.weights) if args.weights else None, loader_workers(args.workers), args.device)
    learner_factory(task.arch, task.pretrained, task.weights)  # architecture and weights checked now
    print(f"{args.path}: {layout.n_images} images in {len(layout.classes)} classes; arch {args.arch}; "
          f"{len(strategies)} strateg{'y' if len(strategies) == 1 else 'ies'} x {args.seeds} seed(s) x batch size(s) "
          f"{', '.join(map(str, sizes))} at {args.size} px, {args.epochs} + 1 epochs each")
    rows = compare([task], strategies, batch_sizes={task.name: sizes}, seeds=args.seeds, epochs=args.epochs,
                   workers=args.workers, records=records)
    _write_table(rows, args.out, f"Strategy comparison on {args.path}", records)
    return 0
