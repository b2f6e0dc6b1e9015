import pytest
import torch
from PIL import Image

from fastai_freeze.demo.cli import CLIError, check_folder, learner_factory, main


def _img(path, color, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _two_classes(root, n=4, split=None):
    for c, col in (("a", "red"), ("b", "blue")):
        for i in range(n):
            _img(root / (split or "") / c / f"{i}.png", col)
    return root


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err  # one line
    return err


@pytest.mark.parametrize("setup,args,message", [
    (lambda p: None, ["{p}/nope"], "no such folder"),
    (lambda p: (p / "x.txt").write_text("hi"), ["{p}/x.txt"], "not a folder"),
    (lambda p: None, ["{p}"], "no image files"),
    (lambda p: [_img(p / "cats" / f"{i}.png", "red") for i in range(3)], ["{p}"], "one class ('cats')"),
    (lambda p: (_two_classes(p), (p / "b" / "bad.png").write_bytes(b"not a png")), ["{p}"], "bad.png: not a readable"),
    (lambda p: _two_classes(p), ["{p}", "--bs", "64"], "--bs 64 is larger than the 6 training images"),
    (lambda p: (_two_classes(p, split="train"), _two_classes(p, split="valid"), _img(p / "valid" / "c" / "0.png", "red")),
     ["{p}"], "class(es) ['c'] have validation images but no training images"),
    (lambda p: (_two_classes(p, split="train"), (p / "valid").mkdir()), ["{p}"], "validation folder holds no image"),
    (lambda p: (_two_classes(p), (p / "out.txt").write_text("x")), ["{p}", "--out", "{p}/out.txt"], "not a folder"),
    (lambda p: _two_classes(p), ["{p}", "--strategies", ","], "names no strategy"),
    (lambda p: _two_classes(p), ["{p}", "--strategies", "fine_tune,nope"], "unknown strategies ['nope']"),
    (lambda p: _two_classes(p), ["{p}", "--bs", "2", "--arch", "resnet_nope"], "unknown architecture 'resnet_nope'"),
    (lambda p: _two_classes(p), ["{p}", "--bs", "2", "--arch", "efficientnet_b0"], "no local ImageNet weights"),
    (lambda p: _two_classes(p), ["{p}", "--bs", "2", "--weights", "{p}/none.pth"], "no such weights file"),
    (lambda p: (_two_classes(p), (p / "w.pth").write_bytes(b"junk")), ["{p}", "--bs", "2", "--weights", "{p}/w.pth"],
     "not a PyTorch state dict"),
    (lambda p: (_two_classes(p), torch.save({"x": torch.zeros(3)}, p / "w.pth")), ["{p}", "--bs", "2", "--weights", "{p}/w.pth"],
     "does not fit"),
    (lambda p: (_two_classes(p), (p / "f.txt").write_text("x")), ["{p}", "--out", "{p}/f.txt/sub"], "cannot be created"),
])
def test_user_errors_are_one_line_and_exit_2_before_training(tmp_path, capsys, setup, args, message):
    setup(tmp_path)
    assert main(["compare"] + [a.format(p=tmp_path) for a in args]) == 2
    assert message in _err(capsys)


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--bs", "1"], ["--size", "x"]])
def test_argument_errors_exit_2(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path)] + args)
    assert e.value.code == 2


def test_both_folder_layouts(tmp_path):
    for split in ("train", "valid"):
        _two_classes(tmp_path / "split", split=split)
    for c, col in (("a", "red"), ("b", "blue")):
        for i in range(5):
            _img(tmp_path / "flat" / c / f"{i}.png", col)
    split = check_folder(tmp_path / "split")
    assert split.classes == ["a", "b"] and split.n_train == 8 and split.valid_name == "valid"
    assert check_folder(tmp_path / "flat").n_train == 8


def test_timm_and_torchvision_archs_and_local_weights(tmp_path):
    import timm
    w = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), w)
    assert callable(learner_factory("resnet18", weights=w))  # timm name, local state dict
    assert callable(learner_factory("tf_efficientnet_lite0"))  # the packaged ImageNet weights
    assert callable(learner_factory("mobilenet_v3_small", pretrained=False))  # torchvision name
    with pytest.raises(CLIError, match="local torch cache"):
        learner_factory("mobilenet_v3_small", pretrained=True)


def test_compare_runs_end_to_end_on_the_real_network(tmp_path, capsys):
    for c, col in (("a", (250, 10, 10)), ("b", (10, 10, 250))):
        for i in range(10):
            _img(tmp_path / "imgs" / c / f"{i}.png", col, size=(20, 28))
    rc = main(["compare", str(tmp_path / "imgs"), "--size", "32", "--bs", "4", "--epochs", "1", "--seeds", "1",
               "--strategies", "fine_tune,fine_tune_with", "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "20 images in 2 classes; arch tf_efficientnet_lite0" in out and "| imgs | 4 |" in out
    assert "fine_tune_with on imgs, batch size 4 (seed 0): bn=" in out  # what auto chose and why
    assert (tmp_path / "out" / "table.md").exists() and (tmp_path / "out" / "comparison.png").exists()


def test_dot_files_are_not_images_as_for_fastai(tmp_path):
    "macOS `._x.png` resource forks and `.thumbnails/` are skipped, as fastai's get_image_files skips them."
    from fastai.data.transforms import get_image_files
    _two_classes(tmp_path)
    (tmp_path / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 not an image")
    _img(tmp_path / "b" / ".thumbnails" / "0.png", "green")
    layout = check_folder(tmp_path)
    assert layout.n_images == 8 == len(get_image_files(tmp_path)) and layout.classes == ["a", "b"]


def test_partial_weights_are_refused_a_missing_classifier_is_not(tmp_path):
    "Loading is not strict, so a file missing body tensors would leave layers random: it is refused."
    import timm
    sd = timm.create_model("resnet18").state_dict()
    torch.save({k: v for i, (k, v) in enumerate(sd.items()) if i % 4}, tmp_path / "partial.pth")
    with pytest.raises(CLIError, match="tensors are missing"):
        learner_factory("resnet18", weights=tmp_path / "partial.pth")
    torch.save({k: v for k, v in sd.items() if not k.startswith("fc.")}, tmp_path / "body.pth")
    assert callable(learner_factory("resnet18", weights=tmp_path / "body.pth"))  # vision_learner's new head replaces fc


def test_a_cache_folder_that_is_a_file_is_said_before_training(tmp_path, monkeypatch, capsys):
    _two_classes(tmp_path / "imgs")
    (tmp_path / "cache").write_text("a file")
    monkeypatch.setenv("FASTAI_FREEZE_CACHE", str(tmp_path / "cache"))
    assert main(["compare", str(tmp_path / "imgs"), "--bs", "2", "--out", str(tmp_path / "out")]) == 2
    assert "set FASTAI_FREEZE_CACHE to a folder" in _err(capsys)


def test_the_learner_reads_the_checked_files_only(tmp_path):
    "A broken symbolic link is not an image: neither the check nor the Learner's data reads it."
    import os

    from fastai_freeze.demo.cli import FolderTask
    _two_classes(tmp_path / "imgs", n=5)
    os.symlink(tmp_path / "gone.png", tmp_path / "imgs" / "a" / "link.png")
    layout = check_folder(tmp_path / "imgs")
    assert layout.n_images == 10
    learn = FolderTask(layout, 16, "resnet18", False, None).learner(bs=2, seed=0)
    assert len(learn.dls.train_ds) + len(learn.dls.valid_ds) == 10 and len(learn.dls.valid_ds) == 2
    assert learn.dls.vocab == ["a", "b"]
