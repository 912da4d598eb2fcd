"""Linear probe (official recipe) and frozen-feature extraction with its cache; `dino-fast linear`
with every official eval_linear.py flag (--evaluate, --val_freq, --num_labels, --avgpool_patchtokens
true); the probe's compute dtype."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dino_fast.errors import ConfigError, DataError
from dino_fast.eval.features import backbone_features, eval_transform, extract_features
from dino_fast.eval.linear import (LinearClassifier, accuracy, load_linear_classifier, main, run_linear_probe)
from dino_fast.models import build_backbone
from dino_fast.precision import resolve_compute_dtype
from tests.helpers import assert_close, write_image_folder


def separable(seed: int, n_per_class: int, classes: int, dim: int):
    """Gaussian blobs around well-separated random class means: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * 3.0
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = means[labels] + 0.3 * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return feats[perm], labels[perm]


# ----------------------------------------------------------------------------- probe
@pytest.mark.parametrize("classes,dim", [(10, 64), (3, 37)])
def test_probe_separable_features_reach_full_accuracy(tmp_path, classes, dim):
    tr_x, tr_y = separable(classes, 40, classes, dim)
    va_x, va_y = separable(classes, 10, classes, dim)  # same seed: same class means
    res = run_linear_probe(tr_x, tr_y, va_x, va_y, epochs=10, lr=0.5, batch_size=64, seed=0,
                           output_path=tmp_path / "probe" / "linear.pth")
    assert res["top1"] >= 99.0 and res["best_top1"] >= res["top1"], res
    assert res["top5"] == 100.0
    # the saved layer reproduces the trained classifier exactly
    clf = load_linear_classifier(res["checkpoint"])
    with torch.no_grad():
        assert_close(clf(va_x), res["classifier"].cpu()(va_x), name="reloaded linear layer")
    assert [p.name for p in (tmp_path / "probe").iterdir()] == ["linear.pth"]  # atomic: no temp left


def test_probe_schedule_is_official():
    """lr = base * batch / 256, cosine over epochs (per-epoch steps), SGD momentum .9."""
    x, y = separable(1, 8, 4, 16)
    epochs, lr, bs = 5, 1e-3, 32
    res = run_linear_probe(x, y, x, y, epochs=epochs, lr=lr, batch_size=bs)
    peak = lr * bs / 256
    assert math.isclose(res["lr"], peak)
    for e, rec in enumerate(res["history"]):
        expected = peak * 0.5 * (1 + math.cos(math.pi * e / epochs))
        assert math.isclose(rec["lr"], expected, rel_tol=1e-9, abs_tol=1e-15), (e, rec["lr"], expected)


def test_linear_classifier_init():
    torch.manual_seed(0)
    clf = LinearClassifier(384 * 4, 1000)
    w = clf.linear.weight
    assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4
    assert torch.count_nonzero(clf.linear.bias) == 0


@pytest.mark.parametrize("classes", [3, 7, 1000])
def test_accuracy_matches_definition(classes):
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(50, classes, generator=g)
    target = torch.randint(0, classes, (50,), generator=g)
    c1, c5 = accuracy(logits, target, (1, 5))
    order = logits.argsort(dim=1, descending=True).tolist()
    ref1 = sum(int(t == o[0]) for t, o in zip(target.tolist(), order))
    ref5 = sum(int(t in o[:5]) for t, o in zip(target.tolist(), order))
    assert (int(c1), int(c5)) == (ref1, ref5)


def test_probe_bad_input():
    x, y = separable(2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"features must be \(N, F\)"):
        run_linear_probe(x[0], y, x, y, epochs=1)
    with pytest.raises(ValueError, match="labels must be"):
        run_linear_probe(x, y[:3], x, y, epochs=1)
    with pytest.raises(TypeError, match="integer class indices"):
        run_linear_probe(x, y.float(), x, y, epochs=1)
    with pytest.raises(ValueError, match="channels"):
        run_linear_probe(x, y, x[:, :4], y, epochs=1)
    with pytest.raises(ValueError, match="num_classes=1"):
        run_linear_probe(x, y, x, y, epochs=1, num_classes=1)


# ----------------------------------------------------------------------------- features
@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", 16, depth=2, img_size=32).eval()


def test_backbone_features_official_layouts(tiny_vit):
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layers = tiny_vit.get_intermediate_layers(x, 2)
        assert_close(backbone_features(tiny_vit, x), tiny_vit(x), name="CLS")
        assert_close(backbone_features(tiny_vit, x, n_last_blocks=2),
                     torch.cat([layers[0][:, 0], layers[1][:, 0]], dim=-1), name="n_last_blocks=2")
        # official eval_linear.py, n_last_blocks=1 + avgpool_patchtokens (interleaved order)
        out = layers[-1][:, 0]
        official = torch.cat((out.unsqueeze(-1), layers[-1][:, 1:].mean(dim=1).unsqueeze(-1)), dim=-1)
        assert_close(backbone_features(tiny_vit, x, n_last_blocks=1, avgpool=True),
                     official.reshape(official.shape[0], -1), name="avgpool n=1")
    with pytest.raises(ValueError, match="n_last_blocks"):
        backbone_features(tiny_vit, x, n_last_blocks=0)


def test_eval_transform():
    img = Image.fromarray(np.zeros((30, 50, 3), dtype=np.uint8))
    assert tuple(eval_transform(36, 32)(img).shape) == (3, 32, 32)
    with pytest.raises(ValueError, match="crop"):
        eval_transform(24, 32)


def test_extract_features_and_cache(tmp_path, tiny_vit):
    from dino_fast.data.folder import ImageFolderDataset
    from torch.utils.data import DataLoader

    write_image_folder(tmp_path / "data", classes=2, per_class=3)
    ds = ImageFolderDataset(tmp_path / "data", transform=eval_transform(36, 32))
    loader = DataLoader(ds, batch_size=4, shuffle=False)
    calls = []
    hook = tiny_vit.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        cache = tmp_path / "cache" / "feats.pt"
        f, y = extract_features(tiny_vit, loader, "cpu", n_last_blocks=2, cache_path=cache, progress=False)
        assert calls and cache.is_file()
        with torch.no_grad():
            ref = backbone_features(tiny_vit, torch.stack([ds[i][0] for i in range(len(ds))]), n_last_blocks=2)
        cpu_fp32 = resolve_compute_dtype("auto", torch.device("cpu")) == torch.float32  # bf16 on an AMX CPU
        tol = dict(rtol=1e-5, atol=1e-5) if cpu_fp32 else dict(rtol=5e-2, atol=5e-2)
        assert_close(f, ref, name="extracted features", **tol)
        assert y.tolist() == [lbl for _, lbl in ds.samples] == [0, 0, 0, 1, 1, 1]

        calls.clear()  # same model, data, transform, options: reused without a forward
        f2, y2 = extract_features(tiny_vit, loader, "cpu", n_last_blocks=2, cache_path=cache, progress=False)
        assert not calls and torch.equal(f2, f) and torch.equal(y2, y)

        extract_features(tiny_vit, loader, "cpu", n_last_blocks=1, cache_path=cache, progress=False)
        assert calls, "changed options must invalidate the cache"
        calls.clear()
        ds.transform = eval_transform(40, 32)
        extract_features(tiny_vit, loader, "cpu", n_last_blocks=1, cache_path=cache, progress=False)
        assert calls, "a changed transform must invalidate the cache"
        calls.clear()
        with torch.no_grad():
            tiny_vit.norm.bias.add_(1.0)
        try:
            f3, _ = extract_features(tiny_vit, loader, "cpu", n_last_blocks=1, cache_path=cache, progress=False)
        finally:
            with torch.no_grad():
                tiny_vit.norm.bias.sub_(1.0)
        assert calls and not torch.allclose(f3[:, :192], f[:, 192:]), "changed weights must invalidate the cache"
        calls.clear()
        cache.write_bytes(b"garbage")  # a corrupt cache is recomputed, not fatal
        extract_features(tiny_vit, loader, "cpu", n_last_blocks=1, cache_path=cache, progress=False)
        assert calls
    finally:
        hook.remove()


def test_extract_features_on_device(tmp_path, tiny_vit, device):
    """Default dtype (precision auto): bf16 autocast on CUDA and AMX CPUs (bf16 tolerance), fp32 elsewhere."""
    import copy

    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 1, 0])
    model = copy.deepcopy(tiny_vit).to(device)
    f, labels = extract_features(model, DataLoader(TensorDataset(x, y), batch_size=2), device, n_last_blocks=2,
                                 progress=False)
    assert f.dtype == torch.float32 and f.device.type == "cpu" and torch.equal(labels, y)
    with torch.no_grad():
        ref = backbone_features(tiny_vit, x, n_last_blocks=2)
    fp32 = resolve_compute_dtype("auto", device) == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if fp32 else dict(rtol=5e-2, atol=5e-2)
    assert_close(f, ref, name=f"features on {device.type}", **tol)


# ----------------------------------------------------------------------------- CLI entry
@pytest.mark.parametrize("mode", ["cached", "online"])
def test_main_end_to_end(tmp_path, mode):
    from dino_fast.export import save_official_backbone

    torch.manual_seed(0)
    weights = save_official_backbone(build_backbone("vit_tiny", 16, depth=1), tmp_path / "w.pth")
    for split, seed in (("train", 1), ("val", 2)):
        write_image_folder(tmp_path / "data" / split, classes=2, per_class=2, seed=seed)
    out = tmp_path / "out"
    rc = main(["--pretrained_weights", str(weights), "--data_path", str(tmp_path / "data"), "--epochs", "2",
               "--batch_size", "4", "--num_workers", "0", "--resize", "36", "--crop", "32", "--device", "cpu",
               "--n_last_blocks", "1", "--mode", mode, "--output_dir", str(out)])
    assert rc == 0
    clf = load_linear_classifier(out / "linear.pth")
    assert (clf.linear.in_features, clf.num_labels) == (192, 1000)  # official default --num_labels 1000
    if mode == "cached":
        assert (out / "features_train.pt").is_file() and (out / "features_val.pt").is_file()


# ----------------------------------------------------------------------------- user mistakes
@pytest.fixture(scope="module")
def depth2_weights(tmp_path_factory):
    from dino_fast.export import save_official_backbone

    torch.manual_seed(0)
    return save_official_backbone(build_backbone("vit_tiny", 16, depth=2), tmp_path_factory.mktemp("w") / "w.pth")


def _linear_argv(weights, data, out, *extra):
    return ["--pretrained_weights", str(weights), "--data_path", str(data), "--epochs", "1", "--batch_size", "4",
            "--num_workers", "0", "--resize", "36", "--crop", "32", "--device", "cpu", "--output_dir", str(out),
            *extra]


def _split_folders(data, train_names, val_names):
    write_image_folder(data / "train", names=train_names, per_class=2, seed=1)
    write_image_folder(data / "val", names=val_names, per_class=2, seed=2)


def test_main_default_n_last_blocks_is_capped_by_depth(tmp_path, depth2_weights):
    """The official default 4 capped at the depth: a 2-block backbone gets 2 CLS tokens, not the traceback of 4."""
    _split_folders(tmp_path / "data", ["a", "b", "c"], ["a", "b", "c"])
    assert main(_linear_argv(depth2_weights, tmp_path / "data", tmp_path / "out", "--num_labels", "3")) == 0
    clf = load_linear_classifier(tmp_path / "out" / "linear.pth")
    assert (clf.linear.in_features, clf.num_labels) == (2 * 192, 3)


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_main_n_last_blocks_above_depth_is_an_error(tmp_path, depth2_weights, mode):
    _split_folders(tmp_path / "data", ["a", "b"], ["a", "b"])
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        main(_linear_argv(depth2_weights, tmp_path / "data", out, "--n_last_blocks", "5", "--mode", mode))
    assert str(e.value).startswith("n_last_blocks=5 but the backbone has 2 blocks: choose 1..2"), str(e.value)
    assert not out.exists(), "nothing may be written before the checks"


def test_main_one_class_is_an_error(tmp_path, depth2_weights):
    _split_folders(tmp_path / "data", ["only"], ["only"])
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        main(_linear_argv(depth2_weights, tmp_path / "data", out))
    msg = str(e.value)
    assert "linear probe" in msg and str(tmp_path / "data" / "train") in msg and "['only']" in msg, msg
    assert "at least 2 classes" in msg and not out.exists()
    with pytest.raises(DataError, match="one class"):  # the library refuses it too
        x, _ = separable(0, 4, 2, 8)
        run_linear_probe(x, torch.zeros(8, dtype=torch.long), x, torch.zeros(8, dtype=torch.long), epochs=1)


def test_main_class_mismatch(tmp_path, depth2_weights, caplog):
    import logging

    _split_folders(tmp_path / "data", ["cat", "dog"], ["cat", "dog", "fox"])
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        main(_linear_argv(depth2_weights, tmp_path / "data", out))
    msg = str(e.value)
    assert "differ (labels are matched by folder name): only in val ['fox']; " in msg, msg
    assert "only in train" not in msg and "--allow_class_mismatch" in msg
    assert not out.exists()
    with caplog.at_level(logging.WARNING):
        assert main(_linear_argv(depth2_weights, tmp_path / "data", out, "--allow_class_mismatch", "--num_labels",
                                 "2")) == 0
    assert load_linear_classifier(out / "linear.pth").num_labels == 2
    assert any("dropped 2 val images" in r.message and "'fox'" in r.message for r in caplog.records), caplog.text


def test_main_output_dir_and_flags(tmp_path, depth2_weights):
    _split_folders(tmp_path / "data", ["a", "b"], ["a", "b"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"output_dir {tmp_path / 'file'} is a file"):
        main(_linear_argv(depth2_weights, tmp_path / "data", tmp_path / "file"))
    with pytest.raises(ConfigError, match=f"output_dir {tmp_path / 'file' / 'o'} lies under {tmp_path / 'file'}"):
        main(_linear_argv(depth2_weights, tmp_path / "data", tmp_path / "file" / "o"))
    with pytest.raises(ConfigError, match="--crop 32 is larger than --resize 30"):
        main(_linear_argv(depth2_weights, tmp_path / "data", tmp_path / "o", "--resize", "30"))
    with pytest.raises(DataError, match=f"data folder not found: {tmp_path / 'nope' / 'train'}"):
        main(_linear_argv(depth2_weights, tmp_path / "nope", tmp_path / "o"))
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "o").exists()


def test_cli_linear_prints_one_line(tmp_path, depth2_weights, capsys):
    from dino_fast.cli import main as cli_main

    _split_folders(tmp_path / "data", ["a", "b"], ["a", "b"])
    rc = cli_main(["linear", *_linear_argv(depth2_weights, tmp_path / "data", tmp_path / "out", "--n_last_blocks",
                                           "3")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["dino-fast: error: n_last_blocks=3 but the backbone has 2 blocks: choose 1..2 "
                               "(default min(4, depth) = 2)"], err


# ----------------------------------------------------------------------------- official command lines
def official_linear_parser():
    """eval_linear.py's parser, transcribed (help texts left out)."""
    import argparse

    from tests.test_knn import official_bool_flag

    parser = argparse.ArgumentParser('Evaluation with linear classification on ImageNet')
    parser.add_argument('--n_last_blocks', default=4, type=int)
    parser.add_argument('--avgpool_patchtokens', default=False, type=official_bool_flag)
    parser.add_argument('--arch', default='vit_small', type=str)
    parser.add_argument('--patch_size', default=16, type=int)
    parser.add_argument('--pretrained_weights', default='', type=str)
    parser.add_argument("--checkpoint_key", default="teacher", type=str)
    parser.add_argument('--epochs', default=100, type=int)
    parser.add_argument("--lr", default=0.001, type=float)
    parser.add_argument('--batch_size_per_gpu', default=128, type=int)
    parser.add_argument("--dist_url", default="env://", type=str)
    parser.add_argument("--local_rank", default=0, type=int)
    parser.add_argument('--data_path', default='/path/to/imagenet/', type=str)
    parser.add_argument('--num_workers', default=10, type=int)
    parser.add_argument('--val_freq', default=1, type=int)
    parser.add_argument('--output_dir', default=".")
    parser.add_argument('--num_labels', default=1000, type=int)
    parser.add_argument('--evaluate', dest='evaluate', action='store_true')
    return parser


def test_linear_takes_every_official_flag():
    from dino_fast.eval.linear import build_parser
    from tests.test_knn import assert_official_flags

    assert_official_flags(build_parser(), official_linear_parser(), "eval_linear.py")


LINEAR_OFFICIAL_DEFAULTS = [  # every eval_linear.py flag at its official default (--evaluate: off, not spelled)
    "--n_last_blocks", "4", "--avgpool_patchtokens", "False", "--arch", "vit_small", "--patch_size", "16",
    "--checkpoint_key", "teacher", "--epochs", "100", "--lr", "0.001", "--batch_size_per_gpu", "128",
    "--dist_url", "env://", "--local_rank", "0", "--data_path", "/path/to/imagenet/", "--num_workers", "10",
    "--val_freq", "1", "--output_dir", ".", "--num_labels", "1000",
]


class _DDP(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_official_linear_command_line_and_evaluate(tmp_path, depth2_weights, capsys):
    """An eval_linear.py command line with every flag at its default, shrunk where a CPU test must;
    then --evaluate on the classifier it wrote and on one in the official checkpoint layout."""
    _split_folders(tmp_path / "data", ["a", "b"], ["a", "b"])
    out = tmp_path / "out"
    shrink = ["--pretrained_weights", str(depth2_weights), "--data_path", str(tmp_path / "data"), "--epochs", "2",
              "--batch_size_per_gpu", "4", "--num_workers", "0", "--resize", "36", "--crop", "32", "--device", "cpu",
              "--output_dir", str(out)]
    assert main([*LINEAR_OFFICIAL_DEFAULTS, *shrink]) == 0
    trained = load_linear_classifier(out / "linear.pth")
    assert (trained.linear.in_features, trained.num_labels) == (2 * 192, 1000)  # n = min(4, depth 2)
    capsys.readouterr()
    assert main([*LINEAR_OFFICIAL_DEFAULTS, *shrink, "--evaluate"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("Accuracy of the network on the 4 test images: ") and str(out / "linear.pth") in line
    # official eval_linear.py's checkpoint.pth.tar: DDP(LinearClassifier) state, optimizer, scheduler
    torch.manual_seed(3)
    official = _DDP(LinearClassifier(2 * 192, 10))
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 5, "state_dict": official.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "best_acc": 12.5}, path)
    assert main([*shrink, "--evaluate", "--linear_weights", str(path), "--n_last_blocks", "2"]) == 0
    assert "on the 4 test images" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"takes 384 features, the backbone gives 192"):
        main([*shrink, "--evaluate", "--linear_weights", str(path), "--n_last_blocks", "1"])
    from dino_fast.errors import CheckpointError

    with pytest.raises(CheckpointError, match="file not found"):
        main([*shrink, "--evaluate", "--linear_weights", str(tmp_path / "nope.pth")])


def test_num_labels_and_avgpool_value(tmp_path, depth2_weights):
    _split_folders(tmp_path / "data", ["a", "b", "c"], ["a", "b", "c"])
    out = tmp_path / "out"
    assert main(_linear_argv(depth2_weights, tmp_path / "data", out, "--num_labels", "7", "--n_last_blocks", "1",
                             "--avgpool_patchtokens", "true")) == 0
    clf = load_linear_classifier(out / "linear.pth")
    assert (clf.linear.in_features, clf.num_labels) == (2 * 192, 7)  # CLS + averaged patch tokens, 7 outputs
    with pytest.raises(ConfigError, match=r"--num_labels 2 but .* has 3 classes"):
        main(_linear_argv(depth2_weights, tmp_path / "data", tmp_path / "o2", "--num_labels", "2"))
    with pytest.raises(SystemExit):  # bool_flag: a value, as the official flag
        main(_linear_argv(depth2_weights, tmp_path / "data", tmp_path / "o3", "--avgpool_patchtokens", "maybe"))


@pytest.mark.parametrize("val_freq,validated", [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3, 4])])
def test_val_freq_is_official(val_freq, validated):
    """eval_linear.py validates when ``epoch % val_freq == 0 or epoch == epochs - 1``."""
    x, y = separable(4, 8, 3, 16)
    res = run_linear_probe(x, y, x, y, epochs=5, lr=0.1, batch_size=8, val_freq=val_freq)
    assert [r["epoch"] for r in res["history"] if "top1" in r] == validated
    with pytest.raises(ConfigError, match="val_freq"):
        run_linear_probe(x, y, x, y, epochs=1, val_freq=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_online_probe_runs_in_the_given_dtype(tiny_vit, monkeypatch, dtype):
    """The probe's forward ran in bf16 whatever the run's precision; now in ``dtype``."""
    import dino_fast.eval.linear as linear
    from torch.utils.data import DataLoader, TensorDataset

    from tests.test_knn import record_autocast

    seen = record_autocast(monkeypatch, linear, "backbone_features")
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    loader = DataLoader(TensorDataset(x, torch.tensor([0, 1, 0, 1, 0, 1])), batch_size=3)
    linear.run_linear_probe_online(tiny_vit, loader, loader, epochs=1, n_last_blocks=1, num_classes=2, compute_dtype=dtype)
    assert seen and set(seen) == {dtype}
