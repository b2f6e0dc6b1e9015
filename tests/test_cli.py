import pytest
from PIL import Image

from fastai_freeze.demo.cli import (
    CLIError,
    cached_weights_path,
    folder_dls_factory,
    main,
    torchvision_learner_factory,
)


def _img(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)


def test_missing_path(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_not_a_folder(tmp_path, capsys):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    assert main(["compare", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_empty_folder(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "no image files" in capsys.readouterr().err


def test_single_class(tmp_path, capsys):
    for i in range(3):
        _img(tmp_path / "cats" / f"{i}.png", "red")
    assert main(["compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "one class ('cats')" in err and "at least two" in err


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path), "--epochs", "0"])
    for c in ("a", "b"):
        _img(tmp_path / c / "0.png", "red")
    assert main(["compare", str(tmp_path), "--strategies", "fine_tune,nope"]) == 2
    assert "unknown strategies ['nope']" in capsys.readouterr().err
    with pytest.raises(CLIError, match="unknown torchvision architecture"):
        cached_weights_path("resnet_nope")


def test_missing_pretrained_weights_say_where(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CLIError, match=r"not in the local torch cache .*--no-pretrained"):
        torchvision_learner_factory("resnet18", pretrained=True)


def test_both_folder_layouts(tmp_path):
    for split in ("train", "valid"):
        for c, col in (("a", "red"), ("b", "blue")):
            for i in range(4):
                _img(tmp_path / "split" / split / c / f"{i}.png", col)
            for i in range(5):
                _img(tmp_path / "flat" / c / f"{i}{split}.png", col)
    m = folder_dls_factory(tmp_path / "split", size=16)
    assert m.classes == ["a", "b"]
    dls = m(4, 0)
    assert len(dls.train_ds) == 8 and len(dls.valid_ds) == 8
    flat = folder_dls_factory(tmp_path / "flat", size=16)(4, 0)
    assert len(flat.train_ds) + len(flat.valid_ds) == 20


def test_compare_runs_end_to_end_without_pretrained_weights(tmp_path, capsys):
    for c, col in (("a", (250, 10, 10)), ("b", (10, 10, 250))):
        for i in range(12):
            _img(tmp_path / "imgs" / c / f"{i}.png", col)
    rc = main(["compare", str(tmp_path / "imgs"), "--no-pretrained", "--size", "32", "--bs", "4",
               "--epochs", "1", "--seeds", "1", "--strategies", "fine_tune,features",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "24 images in 2 classes" in out and "| imgs | 4 |" in out
    assert (tmp_path / "out" / "table.md").exists() and (tmp_path / "out" / "comparison.png").exists()
