"""The suite's report: ``summary.md`` (device, versions, git sha, command, date; the steps with their
status and caps; the tests' counts; what failed, timed out or was skipped and why; one table per
result file with its key columns) and ``summary.json``. Written atomically, after every step and
once more at the end, so whatever stops the suite leaves one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bench.common import markdown_table, write_atomic
from bench.runner import Step

# Key columns per result name in summary.md (a result not listed shows all its columns).
KEY_COLUMNS = {
    "bench_dino_loss": ["B", "V", "K", "dtype", "impl", "ms", "GB/s", "% floor", "peak extra GB", "vs eager",
                        "vs compile"],
    "bench_ema": ["model", "student", "method", "ms", "GB/s", "% of peak", "x vs loop", "kernels/update (profiler)"],
    "model": ["model", "variant", "batch", "ms", "img_s", "x_sdpa", "tflops", "mfu", "peak_gib", "reason"],
    "model_attention": ["model", "variant", "batch", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_tflops", "reason"],
    "bench_data": ["loader", "workers", "batch_size", "views", "images_in_folder", "img_per_s",
                   "speedup_vs_torchvision"],
    "train": ["mode", "path", "attn", "batch", "img_s", "x_ref", "step_ms", "mfu", "peak_gib", "data_ms", "reason"],
}
# The README's "x official" figure: the official main_dino.py step timed on one H200 (2026-12-04).
OFFICIAL_STEP = "the official main_dino.py step (618 img/s, ViT-S/16, batch 64, fp16 AMP)"


def anchor_line(device: str | None) -> str:
    """Which baseline a train speed-up may be read against on this card (one line)."""
    if device and "h200" in re.split(r"[\s_\-/]+", device.lower()):
        return (f"- baseline: the README compares with {OFFICIAL_STEP}, measured on an H200 like this one; "
                "`x_ref` is against the reference path of this run")
    return (f"- baseline: the README's {OFFICIAL_STEP} was measured on an H200, not on this {device or 'device'}: "
            "the one same-card baseline here is the reference path of this run (`x_ref`)")


def result_tables(out: Path, steps: list[Step]) -> list[str]:
    """One markdown section per result file the steps wrote, with the key columns."""
    parts = []
    for step in steps:
        for fname in step.files:
            if not fname.endswith(".json"):
                continue
            try:
                data = json.loads((out / fname).read_text())
            except (OSError, ValueError) as e:
                parts.append(f"### {fname}\n\nunreadable: {e}\n")
                continue
            rows = data.get("rows") or []
            name = data.get("name", fname.partition("-")[0])
            present = [c for r in rows for c in r]
            columns = [c for c in KEY_COLUMNS.get(name, []) if c in present] or list(dict.fromkeys(present))
            notes = data.get("notes", "")
            partial = (f"PARTIAL: {len(rows)} rows, the step stopped before the benchmark finished\n\n"
                       if data.get("complete") is False else "")
            parts.append(f"### {fname[:-5]} (step {step.name})\n\n"
                         f"`{(data.get('env') or {}).get('command', '')}`\n\n" + partial
                         + (markdown_table(rows, columns) if rows else "(no rows)")
                         + (f"\n\n<details><summary>notes</summary>\n\n{notes}\n\n</details>\n" if notes else "\n"))
    return parts


def write_summary(out: Path, steps: list[Step], info: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write summary.md and summary.json into ``out``; returns the markdown path."""
    env_line = ", ".join(f"{k} {info.get(k)}" for k in ("torch", "torch_cuda", "triton", "xformers", "dali",
                                                        "torchvision", "timm", "numpy", "python") if k in info)
    device = info.get("device")
    if info.get("peaks"):
        peaks = f"; datasheet peaks {info['peaks'][0]:g} GB/s, {info['peaks'][1]:g} bf16 TFLOP/s"
    elif info.get("cuda"):
        peaks = "; no datasheet peak known for it (not in bench.common.DEVICE_PEAKS): no % of peak, no MFU"
    else:
        peaks = ""
    lines = [
        f"# dino_fast bench suite: {device or 'unknown device'}",
        "",
        f"- date: {meta['date']}; mode: {meta['mode']}; budget {meta['budget_s']:.0f} s, "
        f"used {meta['elapsed_s']:.0f} s" + (f"; {meta['stopped']}" if meta.get("stopped") else ""),
        f"- device: {device}" + (f"; driver {info['driver']}" if info.get("driver") else "") + peaks,
        f"- versions: {env_line or 'unknown (env step failed)'}",
        f"- kernels: {info.get('kernels', 'unknown')}; xformers kernels usable: {info.get('xformers_usable')}",
        f"- git: {meta['git_sha']}",
        f"- command: `{meta['command']}`",
    ]
    if info.get("cuda"):
        lines.append(anchor_line(device))
    lines += [
        "",
        "## Steps",
        "",
        markdown_table([{"step": s.name, "status": s.status, "seconds": round(s.seconds, 1),
                         "cap s": round(s.cap_s) if s.cap_s else None, "what": s.what,
                         "files": ", ".join(f for f in s.files if f.endswith(".json"))} for s in steps],
                       ["step", "status", "seconds", "cap s", "what", "files"]),
        "",
    ]
    tests = [s for s in steps if s.junit and s.status not in ("pending", "skipped")]
    if tests:
        lines += ["## Tests", ""] + [f"- **{s.name}** ({s.what}): {s.note or 'no detail'}" for s in tests] + [""]
    bad = [s for s in steps if s.status not in ("ok", "pending", "running")]
    lines += ["## Failed, timed out or skipped", ""]
    lines += [f"- **{s.name}**: {s.status}: {s.note or 'no detail'}" + (f" (log: logs/{s.name}.log)" if s.cap_s else "")
              for s in bad] or ["- none"]
    noted = [s for s in steps if s.status == "ok" and s.note and not s.junit]
    if noted:
        lines += ["", "## Notes from successful steps", ""]
        lines += [f"- **{s.name}**: {s.note}" for s in noted]
    lines += ["", "## Results", ""] + result_tables(out, steps)
    path = out / "summary.md"
    write_atomic(path, "\n".join(lines) + "\n")
    write_atomic(out / "summary.json", json.dumps(
        {"meta": meta, "env": info, "steps": [{k: getattr(s, k) for k in ("name", "what", "status", "seconds",
                                                                        "cap_s", "files", "note", "argv")}
                                              for s in steps]}, indent=2, default=str))
    return path
