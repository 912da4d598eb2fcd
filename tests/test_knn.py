"""Weighted k-NN against a direct per-query implementation written from the definition; the
class check (by name) and the `dino-fast knn` command line on small synthetic folders."""
import logging

import pytest
import torch
import torch.nn.functional as F

from dino_fast.errors import ConfigError, DataError
from dino_fast.eval.knn import build_parser, knn_classifier, knn_datasets, knn_eval, main
from tests.helpers import write_image_folder


def _knn_loop(train, train_labels, test, k, T, num_classes):
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    preds = []
    for q in test:
        sims = train @ q
        order = sorted(range(len(train)), key=lambda i: -sims[i].item())[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_labels[i])] += torch.exp(sims[i] / T).item()
        preds.append(sorted(range(num_classes), key=lambda c: -votes[c]))
    return preds


@pytest.mark.parametrize("seed,k,classes", [(0, 20, 10), (1, 5, 3), (2, 1, 7)])
def test_knn_matches_loop(seed, k, classes):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(120, 16, generator=g)
    test = torch.randn(33, 16, generator=g)
    train_labels = torch.randint(0, classes, (120,), generator=g)
    test_labels = torch.randint(0, classes, (33,), generator=g)
    preds = _knn_loop(train, train_labels, test, k, 0.07, classes)
    top1 = 100 * sum(p[0] == int(t) for p, t in zip(preds, test_labels)) / 33
    top5 = 100 * sum(int(t) in p[:min(5, k, classes)] for p, t in zip(preds, test_labels)) / 33
    got1, got5 = knn_classifier(train, train_labels, test, test_labels, k=k, T=0.07, num_classes=classes, chunk=8)
    assert got1 == pytest.approx(top1) and got5 == pytest.approx(top5)


def test_knn_separable_is_perfect():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=g) * 10
    labels = torch.arange(4).repeat_interleave(25)
    feats = centers[labels] + torch.randn(100, 32, generator=g)
    top1, top5 = knn_classifier(feats, labels, feats + 0.01, labels, k=10)
    assert top1 == 100.0 and top5 == 100.0


def test_knn_shape_errors():
    with pytest.raises(ValueError, match="same D"):
        knn_classifier(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 5),
                       torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------- folders and command line
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from dino_fast.models import build_backbone
    from dino_fast.pretrained import save_official_backbone

    torch.manual_seed(0)
    return save_official_backbone(build_backbone("vit_tiny", 16, depth=1), tmp_path_factory.mktemp("w") / "w.pth")


def _folders(root, train_names, val_names, per_class=2):
    write_image_folder(root / "train", names=train_names, per_class=per_class, solid=True)
    write_image_folder(root / "val", names=val_names, per_class=per_class, solid=True)
    return root / "train", root / "val"


def _argv(weights, *extra):
    return ["--pretrained_weights", str(weights), "--image_size", "32", "--batch_size", "4", "--num_workers", "0",
            "--device", "cpu", *extra]


def test_knn_classes_differ_is_an_error_naming_them(tmp_path, weights):
    train, val = _folders(tmp_path, ["cat", "dog"], ["cat", "fox"])
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        main(_argv(weights, "--train_path", str(train), "--val_path", str(val), "--nb_knn", "1",
                   "--cache_dir", str(cache)))
    msg = str(e.value)
    assert "only in train ['dog']" in msg and "only in val ['fox']" in msg, msg
    assert str(train) in msg and str(val) in msg and "--allow_class_mismatch" in msg and "\n" not in msg
    assert not cache.exists(), "nothing may be written before the classes are checked"


def test_knn_allow_class_mismatch_maps_labels_by_name(tmp_path, weights, capsys, caplog):
    """Train [bird, cat, dog], val [cat, dog, fox]: by index val 'cat' would be train 'bird'
    and k=1 would score 0 %; by name it scores 100 % and the 'fox' images are dropped."""
    _folders(tmp_path / "data", ["bird", "cat", "dog"], ["cat", "dog", "fox"])
    train_set, val_set = knn_datasets(tmp_path / "data" / "train", tmp_path / "data" / "val", 32,
                                      allow_class_mismatch=True)
    assert [(p.split("/")[-2], y) for p, y in val_set.samples] == [("cat", 1), ("cat", 1), ("dog", 2), ("dog", 2)]
    with caplog.at_level(logging.WARNING):
        rc = main(_argv(weights, "--data_path", str(tmp_path / "data"), "--nb_knn", "1", "--allow_class_mismatch"))
    assert rc == 0
    assert "| 1 | 100.00 | 100.00 |" in capsys.readouterr().out
    assert any("dropped 2 val images" in r.message and "'fox'" in r.message for r in caplog.records), caplog.text


def test_knn_one_class_is_an_error(tmp_path, weights):
    _folders(tmp_path / "data", ["cat"], ["cat"])
    with pytest.raises(DataError, match=r"only one class folder \(\['cat'\]\).*at least 2 classes") as e:
        main(_argv(weights, "--data_path", str(tmp_path / "data")))
    assert str(tmp_path / "data" / "train") in str(e.value)


def test_knn_data_path_is_train_and_val(tmp_path, weights, capsys):
    _folders(tmp_path / "data", ["cat", "dog"], ["cat", "dog"])
    assert main(_argv(weights, "--data_path", str(tmp_path / "data"), "--nb_knn", "1", "3")) == 0
    out = capsys.readouterr().out
    assert "| 1 | 100.00 | 100.00 |" in out and "| 3 |" in out
    with pytest.raises(ConfigError, match="not both"):
        main(_argv(weights, "--data_path", str(tmp_path / "data"), "--train_path", str(tmp_path)))
    with pytest.raises(ConfigError, match="--val_path missing"):
        main(_argv(weights, "--train_path", str(tmp_path / "data" / "train")))
    with pytest.raises(DataError, match=f"data folder not found: {tmp_path / 'nope' / 'train'}"):
        main(_argv(weights, "--data_path", str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match=r"--nb_knn\) must be an int >= 1, got \[0\]"):
        main(_argv(weights, "--data_path", str(tmp_path / "data"), "--nb_knn", "0"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"output_dir {tmp_path / 'file'} is a file"):
        main(_argv(weights, "--data_path", str(tmp_path / "data"), "--cache_dir", str(tmp_path / "file")))


def test_knn_eval_library_checks_classes(tmp_path):
    """knn_eval (used by the trainer and the demo) refuses mismatched classes too."""
    from dino_fast.models import build_backbone

    train, val = _folders(tmp_path, ["a", "b"], ["a", "c"])
    with pytest.raises(DataError, match=r"only in train \['b'\], only in val \['c'\]"):
        knn_eval(build_backbone("vit_tiny", 16, depth=1), train, val, 32, num_workers=0)


def test_knn_help_shows_every_flag_and_default():
    """The flags and defaults cli.py's knn had, plus --data_path / --allow_class_mismatch, all in -h."""
    text = " ".join(build_parser().format_help().split())
    args = build_parser().parse_args(["--pretrained_weights", "w"])
    expected = {"checkpoint_key": "teacher", "image_size": 224, "nb_knn": [10, 20, 100, 200], "temperature": 0.07,
                "batch_size": 128, "num_workers": 4, "cache_dir": None, "data_path": None, "train_path": None,
                "val_path": None, "allow_class_mismatch": False}
    for name, default in expected.items():
        assert getattr(args, name) == default, name
        assert f"--{name}" in text and f"(default: {default})" in text, name
    assert "--pretrained_weights" in text and "--device" in text


def test_cli_knn_mismatch_prints_one_line(tmp_path, weights, capsys):
    from dino_fast.cli import main as cli_main

    train, val = _folders(tmp_path, ["cat", "dog"], ["cat", "fox"])
    # flags both the old cli.py knn parser and dino_fast.eval.knn.main accept
    rc = cli_main(["knn", "--pretrained_weights", str(weights), "--train_path", str(train), "--val_path", str(val),
                   "--image_size", "32", "--num_workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("dino-fast: error: k-NN: the class folders"), err
    assert "'dog'" in err[0] and "'fox'" in err[0]
