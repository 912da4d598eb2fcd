"""``dino-fast``: train | demo | knn | linear | visualize | export | pack | launch | bench.

Errors a user can fix (missing folder, bad config key, corrupt checkpoint...) print one
line ``dino-fast: error: ...`` and exit with status 2, no traceback. A run stopped by SIGINT /
SIGTERM saves, prints one line and exits with 128 + the signal (130 / 143).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from dino_fast.config import (CHOICES, OFFICIAL_FLAGS, PRESETS, RANGES, ConfigError, TrainConfig, field_docs,
                              load_config, suggest)

__all__ = ["main"]

log = logging.getLogger("dino_fast")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (official names), in the config's sections, default None =
    'not given' (so a --config file is not overridden; -h shows the real default)."""
    p.add_argument("--config", help="YAML file of TrainConfig keys (flags override it; a run's own "
                                    "<output_dir>/config.yaml works); or a preset name: "
                                    f"{', '.join(sorted(x.stem for x in PRESETS.glob('*.yaml')))}")
    docs = field_docs()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        section, doc = docs[f.name]
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} options")
        typ = str(f.type)
        default = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        notes = [f"default: {default!r}"] + ([f"range {RANGES[f.name]}"] if f.name in RANGES else []) + \
                (["main_dino.py flag"] if f.name in OFFICIAL_FLAGS else [])
        kw: dict[str, Any] = {"default": None, "dest": f.name, "help": f"{doc} [{'; '.join(notes)}]"}
        if typ.startswith("tuple"):
            kw.update(nargs=2, type=float, metavar=("LOW", "HIGH"))
        elif typ == "bool":
            kw.update(type=str, metavar="true|false")
        elif typ in ("int", "float"):
            kw.update(type=float if typ == "float" else int)
        if f.name in CHOICES:  # a long list (--arch: every torchvision model) is named in the field's help
            kw.update(metavar="|".join(CHOICES[f.name]) if len(CHOICES[f.name]) <= 12 else f.name.upper())
        groups[section].add_argument(f"--{f.name}", **kw)


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    cfg = load_config(args.config, overrides)
    if cfg.dist_url != "env://":
        log.warning("--dist_url %s is ignored: torchrun's environment (MASTER_ADDR, MASTER_PORT) sets up the "
                    "process group; launch with `torchrun --nproc_per_node N -m dino_fast train ...`", cfg.dist_url)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from dino_fast.train import train_main

    summary = train_main(_config_from_args(args))
    log.info("done: %s", summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate the demo dataset, k-NN a random teacher, pretrain, k-NN the trained teacher."""
    from dino_fast.data.demo import make_demo_dataset
    from dino_fast.eval.periodic import PeriodicKnn
    from dino_fast.train import Trainer

    root = make_demo_dataset(args.data_root)
    overrides = {"data_path": str(root / "train"), "val_path": str(root / "val")}
    overrides.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                      if getattr(args, f.name, None) is not None})
    cfg = load_config(args.config or PRESETS / "demo.yaml", overrides)
    trainer = Trainer(cfg)
    evaluate = PeriodicKnn(cfg, trainer.device, trainer.compute_dtype)  # the run's own k-NN, in its compute dtype

    def knn() -> tuple[float, float]:
        res = evaluate(trainer.teacher.backbone, trainer.step, trainer.state.train_seconds)
        return res["knn_top1"], res["knn_top5"]

    random_top1, random_top5 = knn()
    print(f"k-NN (k={cfg.knn_k}) of the randomly initialised teacher: top-1 {random_top1:.1f}%  "
          f"top-5 {random_top5:.1f}%", flush=True)
    summary = trainer.fit()
    top1, top5 = knn()
    print(f"\n| demo ({cfg.arch}/{cfg.patch_size}, {summary['steps']} steps, {summary['train_minutes']:.1f} min "
          f"on {trainer.device.type}) | k-NN top-1 | k-NN top-5 |\n|---|---|---|\n"
          f"| random init | {random_top1:.1f}% | {random_top5:.1f}% |\n"
          f"| DINO-trained teacher | {top1:.1f}% | {top5:.1f}% |", flush=True)
    print(f"checkpoint: {summary['checkpoint']}\nmetrics: {Path(cfg.output_dir) / 'metrics.csv'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    bench = Path(__file__).resolve().parent.parent / "bench"
    script = bench / ("suite.py" if args.what == "all" else f"bench_{args.what}.py")
    if not script.exists():
        raise ConfigError(f"no benchmark {script} (bench/ ships with the source checkout)")
    # the bench replaces this process: a SIGTERM / Ctrl-C sent to `dino-fast` reaches it (the suite then
    # stops its step, writes its summary and exits 143 / 130)
    os.execv(sys.executable, [sys.executable, str(script), *args.rest])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dino-fast", description="DINO self-supervised pretraining of Vision "
                                "Transformers: train, evaluate (k-NN, linear probe, attention maps), export, benchmark.",
                                epilog="`dino-fast <command> -h` for a command's options.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="DINO pretraining (single process or under torchrun)")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="the main job: demo-data pretraining + k-NN before/after")
    d.add_argument("--data_root", default=None, help="where the demo dataset is generated (default: cache)")
    _add_config_flags(d)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="run bench/bench_<what>.py (dino_loss, ema, model, data, train), or `all` "
                                     "(bench/suite.py: every GPU figure in one results folder)")
    b.add_argument("what")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    for name, module, what in (
            ("knn", "dino_fast.eval.knn", "weighted k-NN of frozen features (eval_knn.py's flags)"),
            ("linear", "dino_fast.eval.linear", "linear probe on frozen features (eval_linear.py's flags)"),
            ("visualize", "dino_fast.eval.visualize", "CLS self-attention maps (visualize_attention.py's flags)"),
            ("export", "dino_fast.export", "a checkpoint as one file: official, released or timm layout"),
            ("pack", "dino_fast.data.pack", "an image folder as WebDataset tar shards with an index"),
            ("launch", "dino_fast.launch", "torchrun with one line and exit status 130 / 143 on a signal")):
        # prefix_chars no option uses: every token goes to `rest`, for the module's own parser
        s = sub.add_parser(name, help=what, add_help=False, prefix_chars="\x00")
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=lambda a, m=module: __import__(m, fromlist=["main"]).main(a.rest))
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; an unknown flag is one line naming it and the closest known flag (no usage dump)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
    if unknown:
        sub = parser._subparsers._group_actions[0].choices[args.command]  # the subcommand's parser
        known = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
        what = (f"unrecognized argument {flags[0]!r} to `dino-fast {args.command}`{suggest(flags[0], known)}"
                if flags else f"unexpected value {unknown[0]!r} to `dino-fast {args.command}` (a value without "
                              f"its flag?)")
        more = len(flags) - 1 if flags else 0
        raise ConfigError(what + (f"; {more} more unrecognized" if more else ""))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except ConfigError as e:
        print(f"dino-fast: error: {e}", file=sys.stderr)
        return 2
    from dino_fast.distributed import launch_rank

    # Under torchrun only rank 0 logs progress; the other ranks still report warnings and errors.
    level = (logging.DEBUG if args.verbose else logging.INFO) if launch_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from dino_fast.errors import DinoFastError
    from dino_fast.signals import Interrupted

    try:
        return int(args.func(args) or 0)
    except (DinoFastError, FileNotFoundError) as e:
        print(f"dino-fast: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if launch_rank() == 0:  # one line per run: every rank saved, rank 0 speaks for them
            print(f"dino-fast: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
