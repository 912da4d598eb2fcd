"""bench/accuracy.py, the time-to-accuracy runner, without training: reading a run's metrics.csv, the
table and JSON written after every run (a stopped campaign keeps its rows), the derived datasets and
the raw-pixel reference."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import accuracy
from bench.accuracy import Campaign, make_dataset, pixel_knn, summarize_metrics, table_rows

FIELDS = ["step", "epoch", "loss", "lr", "wd", "momentum", "teacher_temp", "img_per_s", "train_min", "knn_top1",
          "knn_top5"]


def write_metrics(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    return path


def fake_run(seed: int, end: float) -> list[dict]:
    """A 20-minute run as the trainer logs it: k-NN at step 0, ~5, ~10, ~15 minutes and at the end."""
    rng = np.random.default_rng(seed)
    rows = [{"step": 0, "epoch": 0, "train_min": 0.0, "knn_top1": 21.8, "knn_top5": 60.0}]
    knn_at = {25: (5.2, 25.0 + seed), 50: (10.3, 27.0 + seed), 75: (15.4, 28.0), 100: (20.1, end)}
    for step in range(5, 101, 5):
        row = {"step": step, "epoch": step // 40, "loss": 8.4 - 0.01 * step + rng.uniform(0, 1e-3),
               "train_min": 0.2 * step + 0.1}
        if step in knn_at:
            row["train_min"], row["knn_top1"] = knn_at[step]
        rows.append(row)
    rows[-1]["loss"] = 7.5  # ends above its minimum (7.4 at step 95)
    return rows


def test_summarize_metrics_reads_a_run(tmp_path):
    rows = fake_run(0, 31.4)
    got = summarize_metrics(write_metrics(tmp_path / "metrics.csv", rows), marks=(5, 10))
    losses = [r["loss"] for r in rows if "loss" in r]
    assert got["steps"] == 100 and got["knn_init"] == 21.8
    assert (got["knn_5"], got["min_5"]) == (25.0, 5.2) and (got["knn_10"], got["min_10"]) == (27.0, 10.3)
    assert (got["knn_end"], got["min_end"]) == (31.4, 20.1) and got["train_min"] == 20.1
    assert got["loss_start"] == pytest.approx(losses[0]) and got["loss_end"] == 7.5
    assert got["loss_min"] == pytest.approx(min(losses)) and got["loss_min"] < got["loss_end"]
    assert got["curve"] == [[0.0, 21.8], [5.2, 25.0], [10.3, 27.0], [15.4, 28.0], [20.1, 31.4]]


def test_a_mark_without_a_nearby_knn_stays_empty(tmp_path):
    """A run that stopped at 3 minutes has no ~10-minute value: nothing far from a mark stands in for it."""
    rows = [{"step": 0, "train_min": 0.0, "knn_top1": 20.0}, {"step": 10, "loss": 8.0, "train_min": 1.0},
            {"step": 30, "loss": 7.9, "train_min": 3.0, "knn_top1": 23.0}]
    got = summarize_metrics(write_metrics(tmp_path / "metrics.csv", rows), marks=(5, 10))
    assert got["knn_5"] == 23.0 and got["knn_10"] is None and got["min_10"] is None and got["knn_end"] == 23.0


def _args(tmp_path: Path, **kw) -> argparse.Namespace:
    base = dict(minutes=20.0, knn_every_min=5.0, marks=[5.0, 10.0], cache=str(tmp_path / "cache"),
                out=str(tmp_path / "results"))
    return argparse.Namespace(**{**base, **kw})


def test_campaign_writes_table_and_json_after_every_run(tmp_path):
    """Each run's metrics land in accuracy_<data> (+ the curve) and the per-row table is rewritten
    after each run: a campaign stopped after its first run keeps that run's row."""
    ends = {0: 31.0, 1: 33.0}
    commands = []

    def run(cmd, log, timeout_s):
        out = Path(cmd[cmd.index("--output_dir") + 1])
        seed = int(cmd[cmd.index("--seed") + 1])
        commands.append(cmd)
        write_metrics(out / "metrics.csv", fake_run(seed, ends[seed]))
        return 0, None

    pixels = {"majority": 25.8, "weighted": 28.8}
    campaign = Campaign("tin10", tmp_path / "train", tmp_path / "val", pixels, _args(tmp_path), run=run)
    runs_json, table_json = campaign.runs.json_path, campaign.table.json_path
    campaign.run_one("sk", [], 0)
    saved = json.loads(runs_json.read_text())
    assert not saved["complete"] and [r["seed"] for r in saved["rows"]] == [0]  # on disk before the campaign ends
    assert saved["rows"][0]["knn_end"] == 31.0 and saved["rows"][0]["curve"][-1] == [20.1, 31.0]
    campaign.run_one("sk", [], 1)
    campaign.run_one("locals4", ["--local_crops_number", "4"], 0)
    campaign.close()

    saved, table = json.loads(runs_json.read_text()), json.loads(table_json.read_text())
    assert saved["complete"] and len(saved["rows"]) == 3
    rows = {r["row"]: r for r in table["rows"]}
    assert rows["sk"]["knn_end"] == "32.0 (31.0 / 33.0; 20.1 min)" and rows["sk"]["seeds"] == "0 1"
    assert rows["sk"]["knn_5"] == "25.5 (25.0 / 26.0; 5.2 min)"
    assert rows["locals4"]["flags"] == "--local_crops_number 4" and rows["locals4"]["knn_end"] == "31.0 (20.1 min)"
    assert table["rows"][0]["knn_end"] == "25.8" and "majority" in table["rows"][0]["row"]
    assert table["rows"][1]["knn_end"] == "28.8"
    md = campaign.table.md_path.read_text()
    assert "| sk | 0 1 | 100 |" in md and "PARTIAL" not in md
    assert "| knn_init | knn_5 | knn_10 | knn_end |" in md  # a column per --marks minute
    assert "| knn_5 | min_5 | knn_10 | min_10 | knn_end |" in campaign.runs.md_path.read_text()
    cmd = commands[-1]
    assert cmd[cmd.index("--config") + 1] == "tiny_imagenet_sk" and cmd[-2:] == ["--local_crops_number", "4"]
    assert cmd[cmd.index("--time_budget_min") + 1] == "20" and cmd[cmd.index("--knn_every_min") + 1] == "5"


def test_a_failed_run_is_a_row_with_its_reason(tmp_path):
    campaign = Campaign("tin10", tmp_path / "train", tmp_path / "val", None, _args(tmp_path),
                        run=lambda cmd, log, t: (2, "ConfigError: config patch_size=4: an error the run printed"))
    campaign.run_one("patch4", ["--patch_size", "4"], 0)
    row = json.loads(campaign.runs.json_path.read_text())["rows"][0]
    assert row["rc"] == 2 and "patch_size=4" in row["reason"]
    table = table_rows(campaign.runs.rows, None)
    assert table[0]["seeds"] == "none finished" and "patch_size=4" in table[0]["knn_end"]


def _tiny_source(root: Path, per_class: int = 3, noise: float = 8.0) -> list[str]:
    """10 classes of 64-px JPEGs, each class a flat colour plus noise (per image and per pixel);
    classes.txt in an order that is not the sorted one (the halves follow classes.txt)."""
    names = [f"n{9 - i:08d}" for i in range(10)]  # descending: classes.txt order != sorted order
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        for split in ("train", "val"):
            (root / split / name).mkdir(parents=True)
            for j in range(per_class):
                colour = np.array([25 * i, 255 - 25 * i, (97 * i) % 256], np.float32) + rng.normal(0, noise, 3)
                img = np.clip(colour + rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{split}_{j}.JPEG")
    (root / "classes.txt").write_text("".join(f"{n}\tclass {i}\n" for i, n in enumerate(names)))
    return names


def test_derived_datasets(tmp_path):
    names = _tiny_source(tmp_path / "src")
    cache = tmp_path / "cache"
    assert make_dataset("tin10", tmp_path / "src", cache) == (tmp_path / "src" / "train", tmp_path / "src" / "val")
    for half, keep in (("tin10-half-a", names[:5]), ("tin10-half-b", names[5:])):
        train, val = make_dataset(half, tmp_path / "src", cache)
        for split in (train, val):
            assert sorted(p.name for p in split.iterdir()) == sorted(keep), half
            assert all(len(list((split / c).iterdir())) == 3 for c in keep)
    train, val = make_dataset("tin10-32px", tmp_path / "src", cache)
    files = sorted(train.rglob("*.png")) + sorted(val.rglob("*.png"))
    assert len(files) == 60 and all(Image.open(f).size == (32, 32) for f in files)
    src = Image.open(tmp_path / "src" / "val" / names[3] / "val_1.JPEG").convert("RGB")
    expected = np.asarray(src.resize((32, 32), Image.BICUBIC), np.int16)
    assert np.array_equal(np.asarray(Image.open(val / names[3] / "val_1.png"), np.int16), expected)  # lossless
    assert not (tmp_path / "src" / "tin10-32px").exists()  # nothing written beside the source


def test_pixel_knn_matches_a_plain_loop(tmp_path):
    """Both votes against a per-image loop written from the definition (numpy, no torch)."""
    _tiny_source(tmp_path / "src", per_class=6, noise=60.0)  # classes that overlap: the votes differ
    got = pixel_knn(tmp_path / "src" / "train", tmp_path / "src" / "val", k=5)

    def load(split):
        classes = sorted(p.name for p in (tmp_path / "src" / split).iterdir())
        out = [(np.asarray(Image.open(f).convert("RGB").resize((32, 32), Image.BICUBIC), np.float64).ravel(), y)
               for y, c in enumerate(classes) for f in sorted((tmp_path / "src" / split / c).iterdir())]
        return np.stack([x for x, _ in out]), np.array([y for _, y in out])

    xt, yt = load("train")
    xv, yv = load("val")
    mean = xt.mean(0)
    a = (xt - mean) / np.linalg.norm(xt - mean, axis=1, keepdims=True)
    b = (xv - mean) / np.linalg.norm(xv - mean, axis=1, keepdims=True)
    maj = wei = 0
    for x, y in zip(b, yv):
        sim = a @ x
        near = np.argsort(-sim, kind="stable")[:5]
        maj += np.bincount(yt[near], minlength=10).argmax() == y
        wei += np.bincount(yt[near], weights=np.exp(sim[near] / 0.07), minlength=10).argmax() == y
    assert 10 < 100 * maj / len(yv) < 90 and maj != wei  # neither trivial nor the same as the other vote
    assert got["majority"] == pytest.approx(100 * maj / len(yv), abs=1e-6)
    assert got["weighted"] == pytest.approx(100 * wei / len(yv), abs=1e-6)


def test_rows_and_refusals(tmp_path):
    assert accuracy.parse_rows(["sk", "mine=--lr 0.003 --seed 5"]) == [("sk", []), ("mine", ["--lr", "0.003",
                                                                                              "--seed", "5"])]
    with pytest.raises(SystemExit, match="unknown row"):
        accuracy.parse_rows(["sk_typo"])
    repo = Path(accuracy.__file__).resolve().parents[1]
    with pytest.raises(SystemExit, match="inside the repository"):
        accuracy.main(["--cache", str(repo / "tmp-acc"), "--source", str(tmp_path)])
    assert set(accuracy.ROWS) >= {"sk", "patch4", "resnet18_small", "locals4", "locals10", "locals24px", "batch128",
                                  "sk_koleo"}


def test_append_keeps_the_runs_of_an_earlier_invocation(tmp_path):
    """A campaign continued by a second invocation with --append adds its runs to the same files; without
    --append the files start over (the runner's default, as before)."""
    def run(cmd, log, timeout_s):
        seed = int(cmd[cmd.index("--seed") + 1])
        write_metrics(Path(cmd[cmd.index("--output_dir") + 1]) / "metrics.csv", fake_run(seed, 30.0 + seed))
        return 0, None

    pixels = {"majority": 25.8, "weighted": 28.8}
    first = Campaign("tin10", tmp_path / "train", tmp_path / "val", pixels, _args(tmp_path), run=run)
    first.run_one("sk", [], 0)
    first.close()
    second = Campaign("tin10", tmp_path / "train", tmp_path / "val", pixels, _args(tmp_path, append=True), run=run)
    second.run_one("sk_compile", ["--compile", "true"], 1)
    second.close()
    saved = json.loads(second.runs.json_path.read_text())
    assert [(r["row"], r["seed"]) for r in saved["rows"]] == [("sk", 0), ("sk_compile", 1)]
    assert "appended" in saved["notes"]
    table = {r["row"]: r for r in json.loads(second.table.json_path.read_text())["rows"]}
    assert table["sk"]["knn_end"] == "30.0 (20.1 min)" and table["sk_compile"]["knn_end"] == "31.0 (20.1 min)"
    third = Campaign("tin10", tmp_path / "train", tmp_path / "val", pixels, _args(tmp_path), run=run)
    third.close()
    assert json.loads(third.runs.json_path.read_text())["rows"] == []
