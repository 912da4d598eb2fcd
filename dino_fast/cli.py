"""``dino-fast``: train | demo | knn | linear | visualize | export | bench.

Errors a user can fix (missing folder, bad config key, corrupt checkpoint...) print one
line ``dino-fast: error: ...`` and exit with status 2, no traceback. A run stopped by SIGINT /
SIGTERM saves, prints one line and exits with 128 + the signal (130 / 143).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from dino_fast.config import OFFICIAL_FLAGS, PRESETS, ConfigError, TrainConfig, load_config

__all__ = ["main"]

log = logging.getLogger("dino_fast")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (official names), default None = 'not given'."""
    p.add_argument("--config", help="YAML file of TrainConfig keys (flags override it); "
                                    f"or a preset name: {', '.join(sorted(x.stem for x in PRESETS.glob('*.yaml')))}")
    for f in dataclasses.fields(TrainConfig):
        typ = str(f.type)
        default = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        official = " [main_dino.py flag]" if f.name in OFFICIAL_FLAGS else ""
        # default=None marks "not given" (so a --config file is not overridden); -h shows the real one
        kw: dict[str, Any] = {"default": None, "dest": f.name,
                              "help": f"{' '.join(_doc(f.name).split())} (default: {default!r}){official}"}
        if typ.startswith("tuple"):
            kw.update(nargs=2, type=float, metavar=("LOW", "HIGH"))
        elif typ == "bool":
            kw.update(type=str, metavar="true|false")
        elif typ in ("int", "float"):
            kw.update(type=float if typ == "float" else int)
        p.add_argument(f"--{f.name}", **kw)


def _doc(name: str) -> str:
    import inspect

    src = inspect.getsource(TrainConfig)
    marker = f"    {name}:"
    i = src.find(marker)
    if i < 0:
        return ""
    j = src.find('"""', i)
    return src[j + 3:src.find('"""', j + 3)] if j >= 0 else ""


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
    from dino_fast.eval.knn import knn_eval
    from dino_fast.train import Trainer

    root = make_demo_dataset(args.data_root)
    overrides = {"data_path": str(root / "train"), "val_path": str(root / "val")}
    overrides.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                      if getattr(args, f.name, None) is not None})
    cfg = load_config(args.config or PRESETS / "demo.yaml", overrides)
    trainer = Trainer(cfg)
    size = cfg.eval_size or cfg.global_crops_size

    def knn() -> tuple[float, float]:
        res = knn_eval(trainer.teacher.backbone, cfg.data_path, cfg.val_path, size, ks=(cfg.knn_k,),
                       num_workers=cfg.num_workers, device=trainer.device)
        return res[cfg.knn_k]

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
    return subprocess.call([sys.executable, str(script), *args.rest])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dino-fast", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="DINO pretraining (single process or under torchrun)")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="the main job: demo-data pretraining + k-NN before/after")
    d.add_argument("--data_root", default=None, help="where the demo dataset is generated (default: cache)")
    _add_config_flags(d)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="run bench/bench_<what>.py (loss, ema, model, data, train), or `all` "
                                     "(bench/suite.py: every GPU figure in one results folder)")
    b.add_argument("what")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    for name, module in (("knn", "dino_fast.eval.knn"), ("linear", "dino_fast.eval.linear"),
                         ("visualize", "dino_fast.eval.visualize"), ("export", "dino_fast.export")):
        # prefix_chars no option uses: every token goes to `rest`, for the module's own parser
        s = sub.add_parser(name, help=f"see `dino-fast {name} -h`", add_help=False, prefix_chars="\x00")
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=lambda a, m=module: __import__(m, fromlist=["main"]).main(a.rest))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        print(f"dino-fast: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
