"""The command line as a user meets it: one line for every mistake (no traceback), one run per
output folder, official main_dino.py command lines that start training, -h with defaults."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from dino_fast.cli import main
from tests.helpers import start_train, wait_for
from tests.test_train import tiny_cfg


def _tiny_flags(demo_root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--arch", "vit_tiny", "--depth", "1", "--patch_size", "8", "--out_dim", "64",
            "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--global_crops_size", "32",
            "--local_crops_size", "16", "--local_crops_number", "2", "--batch_size_per_gpu", "8",
            "--num_workers", "0", "--progress", "false", "--loss_impl", "torch", "--ema_impl", "foreach",
            "--data_path", str(demo_root / "train"), "--output_dir", str(out), *extra]


def _one_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("dino-fast")]
    assert len(err) == 1 and err[0].startswith("dino-fast: error: "), err
    return err[0]


def test_output_dir_is_a_file(demo_root, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _one_error(_tiny_flags(demo_root, f, "--max_steps", "1"), capsys)
    assert "lies under" in _one_error(_tiny_flags(demo_root, f / "sub", "--max_steps", "1"), capsys)


@pytest.mark.parametrize("content", [b"", b"\x89PNG garbage", b"\x80\x04\x95" + b"\x00" * 50], ids=["empty", "png", "pickle"])
def test_resume_from_garbage(demo_root, tmp_path, capsys, content):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    err = _one_error(_tiny_flags(demo_root, tmp_path / "o", "--max_steps", "1", "--resume", str(bad)), capsys)
    assert str(bad) in err and "not a readable checkpoint" in err


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_resume_auto_with_a_planted_pickle_runs_no_code(demo_root, tmp_path, capsys):
    """A file dropped into checkpoints/ under a checkpoint's name, picked up by --resume auto."""
    marker = tmp_path / "marker"
    ck = tmp_path / "o" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "checkpoint-00000009.pth").write_bytes(pickle.dumps({"format": "dino_fast", "x": _Payload(marker)}))
    step = ck / "step-00000010"
    step.mkdir()
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    err = _one_error(_tiny_flags(demo_root, tmp_path / "o", "--max_steps", "1", "--resume", "auto"), capsys)
    assert "step-00000010" in err and not marker.exists()
    (step / ".metadata").unlink()
    step.rmdir()
    err = _one_error(_tiny_flags(demo_root, tmp_path / "o", "--max_steps", "1", "--resume", "auto"), capsys)
    assert "checkpoint-00000009.pth" in err and not marker.exists()


def test_resume_with_another_depth_names_the_flag(demo_root, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_tiny_flags(demo_root, out, "--max_steps", "1")) == 0
    err = _one_error(_tiny_flags(demo_root, out, "--max_steps", "2", "--depth", "2", "--resume", "auto"), capsys)
    assert "does not fit this model" in err and "--depth 1" in err and "--depth 2" in err


def test_two_runs_on_one_folder(demo_root, tmp_path, capsys):
    """The second run stops with one line naming the holder; nothing of the first is touched."""
    out = tmp_path / "o"
    log_file = tmp_path / "first.log"
    first = start_train(tiny_cfg(demo_root, out, epochs=400, checkpoint_every=10_000), log_file)
    try:
        wait_for(out / "metrics.csv", first, log_file)
        before = (out / "metrics.csv").stat().st_size
        err = _one_error(_tiny_flags(demo_root, out, "--max_steps", "1"), capsys)
        assert "in use by another run" in err and f"pid {first.pid}" in err
        # the second run (max_steps 1) would have saved step-00000001; the first saves at epoch ends (5 steps)
        assert not (out / "checkpoints" / "step-00000001").exists()
        assert (out / "metrics.csv").stat().st_size >= before
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    assert main(_tiny_flags(demo_root, out, "--max_steps", "1")) == 0  # a killed holder's lock is gone


def test_orphans_of_a_killed_save_are_removed(demo_root, tmp_path):
    ck = tmp_path / "o" / "checkpoints"
    (ck / "step-00000004.tmp").mkdir(parents=True)
    (ck / "checkpoint-00000003.pth.tmpab12").write_bytes(b"torn")
    (ck / "notes.txt").write_text("mine")
    assert main(_tiny_flags(demo_root, tmp_path / "o", "--max_steps", "1")) == 0
    assert sorted(p.name for p in ck.iterdir()) == ["notes.txt", "step-00000001"]


OFFICIAL_DEFAULTS = [  # every main_dino.py flag at its official default (README: "--help")
    "--patch_size", "16", "--out_dim", "65536", "--norm_last_layer", "True", "--momentum_teacher", "0.996",
    "--use_bn_in_head", "False", "--warmup_teacher_temp", "0.04", "--teacher_temp", "0.04",
    "--warmup_teacher_temp_epochs", "0", "--use_fp16", "True", "--weight_decay", "0.04", "--weight_decay_end", "0.4",
    "--clip_grad", "3.0", "--batch_size_per_gpu", "64", "--epochs", "100", "--freeze_last_layer", "1",
    "--lr", "0.0005", "--warmup_epochs", "10", "--min_lr", "1e-06", "--optimizer", "adamw", "--drop_path_rate", "0.1",
    "--global_crops_scale", "0.4", "1.", "--local_crops_number", "8", "--local_crops_scale", "0.05", "0.4",
    "--saveckp_freq", "20", "--seed", "0", "--num_workers", "10", "--dist_url", "env://", "--local_rank", "0",
]
# The official README's commands (main_dino.py's flags after the script name).
OFFICIAL_COMMANDS = {
    "vanilla": ["--arch", "vit_small"],
    "boosted": ["--arch", "vit_small", "--epochs", "300", "--teacher_temp", "0.07", "--warmup_teacher_temp_epochs",
                "30", "--norm_last_layer", "false"],
    "resnet50": ["--arch", "resnet50", "--optimizer", "sgd", "--lr", "0.03", "--weight_decay", "1e-4",
                 "--weight_decay_end", "1e-4", "--global_crops_scale", "0.14", "1", "--local_crops_scale", "0.05", "0.14"],
}


@pytest.mark.parametrize("name", list(OFFICIAL_COMMANDS))
def test_official_command_lines_start_training(demo_root, tmp_path, name):
    """The official command with every other flag spelled out at its default, shrunk only in
    what a CPU test can afford (crop sizes, batch, one step)."""
    argv = ["train", *OFFICIAL_DEFAULTS, *OFFICIAL_COMMANDS[name], "--data_path", str(demo_root / "train"),
            "--output_dir", str(tmp_path / name), "--max_steps", "1", "--batch_size_per_gpu", "8",
            "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2", "--num_workers", "0",
            "--progress", "false", "--out_dim", "1024", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32",
            "--patch_size", "8", "--depth", "1"]
    assert main(argv) == 0
    assert (tmp_path / name / "checkpoints" / "step-00000001" / ".metadata").is_file()


def test_help_shows_defaults_and_official_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "-h"])
    raw = capsys.readouterr().out
    out = " ".join(raw.split())
    assert "[default: 65536; range [1, inf); main_dino.py flag]" in out and "--use_fp16" in out
    assert "[default: 'adamw'; main_dino.py flag]" in out and "adamw|sgd|lars" in out and "--accum_steps" in out
    groups = [ln[:-len(" options:")] for ln in raw.splitlines() if ln.endswith(" options:") and ln != "options:"]
    assert groups == ["data", "model", "loss", "optimisation", "engine", "run"]  # issue 30 row 6: one group of 68
    assert "--attn_backend" in raw.split("engine options:")[1].split("run options:")[0]
    with pytest.raises(SystemExit):
        main(["-h"])
    assert "``" not in capsys.readouterr().out  # no raw markup in the description


def test_export_formats(demo_root, tmp_path, capsys):
    import torch

    from dino_fast.pretrained import load_pretrained

    out = tmp_path / "o"
    assert main(_tiny_flags(demo_root, out, "--max_steps", "2")) == 0
    ckpt = out / "checkpoints" / "step-00000002"
    teacher = load_pretrained(ckpt)
    for fmt in ("official", "timm", "released"):
        dest = tmp_path / f"{fmt}.pth"
        assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--output", str(dest)]) == 0
        assert torch.equal(load_pretrained(dest).cls_token, teacher.cls_token), fmt
    official = torch.load(tmp_path / "official.pth", map_location="cpu")
    assert official["epoch"] == 0 and official["args"]["depth"] == 1  # 2 steps of a 5-step epoch
    assert "not a checkpoint directory" in _one_error(["export", "--checkpoint", str(tmp_path / "official.pth"),
                                                       "--output", str(tmp_path / "x.pth")], capsys)
