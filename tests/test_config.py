"""Config: official names, YAML + overrides, one clear line for every bad key or value."""
import pytest

from dino_fast.cli import main
from dino_fast.config import ConfigError, TrainConfig, load_config


def test_defaults_are_the_official_recipe():
    c = TrainConfig()
    assert (c.out_dim, c.momentum_teacher, c.teacher_temp, c.student_temp, c.center_momentum) == \
        (65536, 0.996, 0.04, 0.1, 0.9)
    assert (c.global_crops_scale, c.local_crops_scale, c.global_crops_size, c.local_crops_size) == \
        ((0.4, 1.0), (0.05, 0.4), 224, 96)
    assert (c.weight_decay, c.weight_decay_end, c.clip_grad, c.lr, c.min_lr) == (0.04, 0.4, 3.0, 5e-4, 1e-6)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("arch: vit_tiny\nlr: 0.001\nlocal_crops_scale: [0.1, 0.3]\nnorm_last_layer: false\n")
    c = load_config(p, {"lr": 0.002})
    assert c.arch == "vit_tiny" and c.lr == 0.002 and c.local_crops_scale == (0.1, 0.3)
    assert c.norm_last_layer is False
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_unknown_key_names_it_and_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'lrr' in .*c.yaml \(did you mean 'lr'\?\)"):
        load_config(p)


@pytest.mark.parametrize("changes,match", [
    ({"arch": "vit_huge"}, "arch='vit_huge'"),
    ({"global_crops_scale": (0.5, 0.2)}, "global_crops_scale"),
    ({"global_crops_size": 100}, "multiple of patch_size"),
    ({"batch_size_per_gpu": 0}, "batch_size_per_gpu=0"),
    ({"epochs": "ten"}, "expected int"),
])
def test_bad_values(changes, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(changes)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_bad_key_one_line(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("teacher_tmp: 0.04\n")
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'teacher_tmp'" in err[0] and "teacher_temp" in err[0]


def test_base_presets_chain_and_override(tmp_path):
    """A config file may start from another (``base:``, a file or a preset name); its keys win."""
    c = load_config("tiny_imagenet_sk")
    base = load_config("tiny_imagenet")
    assert (c.arch, c.depth, c.teacher_temp) == (base.arch, base.depth, base.teacher_temp)
    assert (c.centering, c.momentum_teacher, c.lr) == ("sinkhorn_knopp", 0.99, 0.002)
    assert (base.centering, base.momentum_teacher, base.lr) == ("center", 0.996, 0.001)
    p = tmp_path / "mine.yaml"
    p.write_text("base: tiny_imagenet_sk\nlr: 0.003\nkoleo_weight: 0.1\n")
    mine = load_config(p, {"epochs": 3})
    assert (mine.lr, mine.koleo_weight, mine.momentum_teacher, mine.epochs) == (0.003, 0.1, 0.99, 3)
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="its own base"):
        load_config(loop)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny_imagenet\nlrr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'lrr' in .*bad.yaml"):
        load_config(bad)


@pytest.mark.parametrize("changes,match", [
    ({"drop_path_rate": 5}, r"drop_path_rate=5.*\[0, 1\)"),  # issue 29 row 3: was a traceback at the first forward
    ({"drop_path_rate": 1.0}, r"drop_path_rate=1.0"),
    ({"lr": float("inf")}, r"lr=inf: must be a finite number in \(0, inf\)"),  # issue 29 row 8: was accepted
    ({"weight_decay": float("nan")}, r"weight_decay=nan"),
    ({"teacher_temp": float("nan")}, r"teacher_temp=nan"),
    ({"momentum_teacher": 1.5}, r"momentum_teacher=1.5.*\[0, 1\]"),
    ({"ibot_mask_sample_probability": -0.1}, "ibot_mask_sample_probability"),
])
def test_every_range_is_checked_with_its_rule(changes, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(changes)


def test_every_numeric_field_has_a_range():
    """One table beside the fields (config.RANGES) checks every int and float field."""
    import dataclasses

    from dino_fast.config import RANGES, in_range

    numeric = {f.name for f in dataclasses.fields(TrainConfig) if str(f.type) in ("int", "float")}
    assert numeric == set(RANGES), f"no range: {sorted(numeric - set(RANGES))}; stale: {sorted(set(RANGES) - numeric)}"
    defaults = TrainConfig()
    assert all(in_range(getattr(defaults, k), rule) for k, rule in RANGES.items())
    assert in_range(0.0, "[0, 1)") and not in_range(1.0, "[0, 1)") and not in_range(0.0, "(0, inf)")


def test_unknown_flag_one_line_with_suggestion(capsys):
    assert main(["train", "--momentum_teachr", "0.9", "--data_path", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized argument '--momentum_teachr'" in err[0]
    assert "did you mean '--momentum_teacher'?" in err[0]
