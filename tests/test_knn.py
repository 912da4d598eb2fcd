"""Weighted k-NN against a direct per-query implementation written from the definition; the
class check (by name); the `dino-fast knn` command line on small synthetic folders, with every
official eval_knn.py flag; the k-NN of a training run in the run's compute dtype."""
import argparse
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
    from dino_fast.export import save_official_backbone

    torch.manual_seed(0)
    return save_official_backbone(build_backbone("vit_tiny", 16, depth=1), tmp_path_factory.mktemp("w") / "w.pth")


def _folders(root, train_names, val_names, per_class=2):
    write_image_folder(root / "train", names=train_names, per_class=per_class, solid=True)
    write_image_folder(root / "val", names=val_names, per_class=per_class, solid=True)
    return root / "train", root / "val"


def _argv(weights, *extra):
    return ["--pretrained_weights", str(weights), "--image_size", "32", "--batch_size_per_gpu", "4", "--num_workers",
            "0", "--device", "cpu", *extra]


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


def test_cli_knn_mismatch_prints_one_line(tmp_path, weights, capsys):
    from dino_fast.cli import main as cli_main

    train, val = _folders(tmp_path, ["cat", "dog"], ["cat", "fox"])
    # flags both the old cli.py knn parser and dino_fast.eval.knn.main accept
    rc = cli_main(["knn", "--pretrained_weights", str(weights), "--train_path", str(train), "--val_path", str(val),
                   "--image_size", "32", "--num_workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("dino-fast: error: k-NN: the class folders"), err
    assert "'dog'" in err[0] and "'fox'" in err[0]


# ----------------------------------------------------------------------------- official command lines
def official_bool_flag(s):
    """facebookresearch/dino utils.bool_flag."""
    if s.lower() in {"off", "false", "0"}:
        return False
    if s.lower() in {"on", "true", "1"}:
        return True
    raise argparse.ArgumentTypeError("invalid value for a boolean flag")


def official_knn_parser():
    """eval_knn.py's parser, transcribed (help texts left out)."""
    parser = argparse.ArgumentParser('Evaluation with weighted k-NN on ImageNet')
    parser.add_argument('--batch_size_per_gpu', default=128, type=int)
    parser.add_argument('--nb_knn', default=[10, 20, 100, 200], nargs='+', type=int)
    parser.add_argument('--temperature', default=0.07, type=float)
    parser.add_argument('--pretrained_weights', default='', type=str)
    parser.add_argument('--use_cuda', default=True, type=official_bool_flag)
    parser.add_argument('--arch', default='vit_small', type=str)
    parser.add_argument('--patch_size', default=16, type=int)
    parser.add_argument("--checkpoint_key", default="teacher", type=str)
    parser.add_argument('--dump_features', default=None)
    parser.add_argument('--load_features', default=None)
    parser.add_argument('--num_workers', default=10, type=int)
    parser.add_argument("--dist_url", default="env://", type=str)
    parser.add_argument("--local_rank", default=0, type=int)
    parser.add_argument('--data_path', default='/path/to/imagenet/', type=str)
    return parser


_SAMPLES = {int: "3", float: "0.5", str: "x", None: "x"}


def assert_official_flags(ours: argparse.ArgumentParser, official: argparse.ArgumentParser, script: str) -> None:
    """Every official flag: same name, default, nargs, choices, action and type (the same value
    parsed from the same string; bool_flag on every spelling), marked in -h as the script's."""
    by_option = {o: a for a in ours._actions for o in a.option_strings}
    for theirs in official._actions:
        if isinstance(theirs, argparse._HelpAction):
            continue
        flag = theirs.option_strings[0]
        mine = by_option.get(flag)
        assert mine is not None, f"{flag} missing"
        assert (mine.dest, mine.default, mine.nargs, mine.choices, type(mine)) == \
            (theirs.dest, theirs.default, theirs.nargs, theirs.choices, type(theirs)), flag
        if theirs.type is official_bool_flag:
            for text in ("True", "false", "ON", "0", "1", "off"):
                assert mine.type(text) == official_bool_flag(text), (flag, text)
            with pytest.raises(argparse.ArgumentTypeError):
                mine.type("maybe")
        elif not isinstance(theirs, argparse._StoreTrueAction):
            sample = _SAMPLES[theirs.type if theirs.type in _SAMPLES else None]
            assert (mine.type or str)(sample) == (theirs.type or str)(sample), flag
        assert mine.help.endswith(f"[{script} flag]"), (flag, mine.help)


def test_knn_takes_every_official_flag():
    assert_official_flags(build_parser(), official_knn_parser(), "eval_knn.py")
    help_text = build_parser().format_help()
    assert "official eval_knn.py flags" in help_text and "--precision" in help_text


KNN_OFFICIAL_DEFAULTS = [  # every eval_knn.py flag at its official default (dump/load_features: None, not spelled)
    "--batch_size_per_gpu", "128", "--nb_knn", "10", "20", "100", "200", "--temperature", "0.07",
    "--use_cuda", "True", "--arch", "vit_small", "--patch_size", "16", "--checkpoint_key", "teacher",
    "--num_workers", "10", "--dist_url", "env://", "--local_rank", "0", "--data_path", "/path/to/imagenet/",
]


def test_official_knn_command_line_runs(tmp_path, weights, capsys):
    """An eval_knn.py command line with every flag at its default, then shrunk where a CPU test
    must (data, weights, workers, crop); --dump_features writes the official files, which
    --load_features reads back without weights or images."""
    _folders(tmp_path / "data", ["cat", "dog"], ["cat", "dog"])
    dump = tmp_path / "feats"
    argv = [*KNN_OFFICIAL_DEFAULTS, "--pretrained_weights", str(weights), "--data_path", str(tmp_path / "data"),
            "--num_workers", "0", "--image_size", "32", "--device", "cpu", "--dump_features", str(dump)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| 10 | 100.00 | 100.00 |" in table and "| 200 |" in table
    files = sorted(p.name for p in dump.iterdir())
    assert files == ["testfeat.pth", "testlabels.pth", "trainfeat.pth", "trainlabels.pth"]
    train = torch.load(dump / "trainfeat.pth")
    assert train.shape == (4, 192) and torch.allclose(train.norm(dim=1), torch.ones(4))  # official: l2-normalised
    assert torch.load(dump / "trainlabels.pth").tolist() == [0, 0, 1, 1]
    assert main(["--load_features", str(dump), "--nb_knn", "10", "200"]) == 0  # no weights, no images
    assert capsys.readouterr().out == "| k | top-1 | top-5 |\n|---|---|---|\n" + "\n".join(
        line for line in table.splitlines() if line.startswith(("| 10 ", "| 200 "))) + "\n"
    with pytest.raises(ConfigError, match="--load_features .*no trainfeat.pth"):
        main(["--load_features", str(tmp_path)])
    with pytest.raises(ConfigError, match="--pretrained_weights is needed"):
        main(["--data_path", str(tmp_path / "data")])


def test_knn_distributed_flags(tmp_path, weights, caplog, monkeypatch):
    _folders(tmp_path / "data", ["cat", "dog"], ["cat", "dog"])
    with caplog.at_level(logging.WARNING):
        assert main(_argv(weights, "--data_path", str(tmp_path / "data"), "--nb_knn", "1", "--local_rank", "3",
                          "--dist_url", "tcp://localhost:1234", "--use_cuda", "false")) == 0
    assert any("--dist_url tcp://localhost:1234 ignored" in r.message for r in caplog.records), caplog.text
    assert any("the weights hold a vit_tiny/16, not --arch vit_small" in r.message for r in caplog.records)
    monkeypatch.setenv("WORLD_SIZE", "8")  # torch.distributed.launch --nproc_per_node=8 eval_knn.py ...
    with pytest.raises(ConfigError, match="runs in one process.*WORLD_SIZE=8"):
        main(_argv(weights, "--data_path", str(tmp_path / "data")))


# ----------------------------------------------------------------------------- the run's compute dtype
def record_autocast(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that each call records the CPU autocast dtype it ran under
    (float32 when autocast is off); returns the list it fills."""
    seen = []
    original = getattr(module, name)

    def recording(*args, **kw):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return original(*args, **kw)

    monkeypatch.setattr(module, name, recording)
    return seen


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_in_training_knn_runs_in_the_run_precision(demo_root, tmp_path, monkeypatch, precision):
    """The trainer's k-NN (random-init baseline and final) runs its backbone in the run's compute
    dtype. On CPU `auto` means fp32, so a `precision: bf16` run is the one that tells a k-NN that
    chooses its own dtype (fp32 here) from one that takes the run's (bf16)."""
    import dino_fast.eval.features as features
    from dino_fast.train import Trainer
    from tests.test_train import tiny_cfg

    seen = record_autocast(monkeypatch, features, "backbone_features")
    cfg = tiny_cfg(demo_root, tmp_path, precision=precision, max_steps=1, knn_every_min=1.0,
                   val_path=str(demo_root / "val"), eval_size=32, knn_k=5)
    Trainer(cfg).fit()
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen and set(seen) == {expected}, (precision, set(seen))


@pytest.mark.parametrize("precision,expected", [("fp32", torch.float32), ("auto", torch.bfloat16),
                                                ("fp16", torch.float16)])
def test_knn_dtype_of_a_cuda_run(demo_root, tmp_path, monkeypatch, precision, expected):
    """On CUDA `auto` is bf16: a `precision: fp32` run must still evaluate in fp32 (mocked device)."""
    import dino_fast.eval.knn as knn
    from dino_fast.eval.periodic import PeriodicKnn
    from dino_fast.precision import resolve_compute_dtype
    from tests.test_train import tiny_cfg

    got = {}
    monkeypatch.setattr(knn, "knn_eval", lambda *a, **kw: got.update(kw) or {5: (0.0, 0.0)})
    cuda = torch.device("cuda", 0)
    cfg = tiny_cfg(demo_root, tmp_path, precision=precision, knn_every_min=1.0, val_path="v", knn_k=5)
    PeriodicKnn.from_config(cfg, cuda, resolve_compute_dtype(cfg.precision, cuda))(torch.nn.Identity(), 0, 0.0)
    assert got["compute_dtype"] == expected and got["device"] == cuda
