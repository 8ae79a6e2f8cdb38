"""CPU speed and memory benchmark of PVT + DETR against the official design and HF DETR-R50.

    python -m benchmarks.benchmark --model pvt_small --threads 2 --json

Inference rows (batch 1, fp32, eval mode, no_grad) at each of --sizes: `ours eager` (pvt_detr.build_model),
`ours compiled` (torch.compile(model, options={"freezing": True}), as Detector(..., compile=True); its first call,
which compiles, is reported apart), `ours ONNX` (pvt_detr.export.export_onnx, once per run, with the exporter that
checks and runs fastest, under onnxruntime), `official` (benchmarks/official_design.py, eager) and `HF DETR-R50`
(transformers' DetrForObjectDetection with a randomly initialised ResNet-50; skipped when transformers is missing).
Training rows: one step on a batch of two images of --train_sizes padded together, for ours (ModelConfig's
grad_checkpointing, and without it) and the official design: time, RSS after building, peak RSS.
Every measurement runs in its own process; rounds run every measurement once, in alternating order, and a row's
runs over all rounds are pooled into median [min - max]. The reference rate is `torch.mm` of 2048 x 2048 float32
matrices, measured in every round. `--json` saves the run; `--show FILE` prints a saved run's tables again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.measure import INFER_DESIGNS, TRAIN_DESIGNS
from benchmarks.op_breakdown import format_breakdown
from pvt_detr import list_backbones

RESULT_TAG = "@@benchmark-result "
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
MEASUREMENTS = (*INFER_DESIGNS, "train", "breakdown")
BREAKDOWN_DESIGNS = ("eager", "compiled", "official")
LABELS = {"eager": "ours eager", "compiled": "ours compiled", "onnx": "ours ONNX + onnxruntime",
          "official": "official design", "hf": "HF DETR-R50", "linears": "ours: its linear maps alone",
          "ours": "ours (grad checkpointing on)", "ours_no_checkpointing": "ours (grad checkpointing off)"}

# The aims, relative to the official design in the same run (2 threads, fp32, pvt_small).
AIMS = {
    ("speedup", "compiled", (512, 512)): 1.35,
    ("speedup", "compiled", (800, 1216)): 2.4,
    ("pct_mm", "compiled", (512, 512)): 0.75,
    ("pct_mm", "compiled", (800, 1216)): 0.75,
    ("speedup", "eager", (512, 512)): 1.0,
    ("speedup", "eager", (800, 1216)): 1.0,
    ("rss", "ours", None): 0.4,
}


# ------------------------------------------------------------------------------------------------ machine, files


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's "model name" from /proc/cpuinfo (or the given text), else `platform.processor()`."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, flags=re.MULTILINE)
    return (match.group(1).strip() if match else "") or platform.processor() or platform.machine() or "unknown-cpu"


def slug(text: str) -> str:
    """Lower-case letters, digits and single dashes: "AMD EPYC 9R14 96-Core" -> "amd-epyc-9r14-96-core"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def results_path(cpu: str, model: str, threads: int) -> Path:
    """benchmarks/results/<cpu-model>-<model>-<threads>t-fp32.json: one file per CPU model and configuration."""
    return RESULTS_DIR / f"{slug(cpu)}-{model}-{threads}t-fp32.json"


def machine_info() -> dict:
    """CPU model, core count, the CPU capability torch dispatches to, library versions, load average."""
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("onnxruntime", "onnx", "transformers"):
        if importlib.util.find_spec(name) is not None:
            versions[name] = __import__(name).__version__
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **versions, "load_average_start": os.getloadavg()[0]}


def parse_size(text: str) -> tuple[int, int]:
    """"800x1216" -> (800, 1216) (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 800x1216, got {text!r}") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"a size needs at least 32 x 32 pixels, got {text!r}")
    return h, w


def size_list(text: str) -> list[tuple[int, int]]:
    return [parse_size(s) for s in text.split(",") if s.strip()]


def fmt_size(size) -> str:
    return f"{size[0]}x{size[1]}"


# ------------------------------------------------------------------------------------------------ the plan


def plan_round(opts: argparse.Namespace, first: bool, onnx_path: str | None) -> list[dict]:
    """The measurement specs of one round: the matmul reference, inference rows size by size, training rows,
    breakdowns. FLOPs are counted in the first round (ours once, by the eager row if there is one)."""
    base = {"model": opts.model, "threads": opts.threads, "spin": opts.omp_wait_policy == "active"}
    specs = [{**base, "kind": "matmul", "repeats": opts.repeats, "warmup": 2}] if opts.infer else []
    for size in opts.sizes:
        for design in opts.infer:
            ours_once = design in ("compiled", "onnx") and "eager" not in opts.infer  # else the eager row counts
            counts = design in ("eager", "official", "hf") or ours_once
            spec = {**base, "kind": "infer", "design": design, "size": size, "repeats": opts.repeats,
                    "warmup": opts.warmup, "flops": first and counts}
            if design == "onnx":
                if onnx_path is None:
                    continue
                spec["onnx_path"] = onnx_path
            specs.append(spec)
    if "train" in opts.only:
        specs += [{**base, "kind": "train", "design": design, "sizes": opts.train_sizes, "boxes": opts.boxes,
                   "repeats": opts.train_repeats, "warmup": 1} for design in TRAIN_DESIGNS]
    if "breakdown" in opts.only:
        specs += [{**base, "kind": "breakdown", "design": design, "size": opts.sizes[0], "repeats": opts.repeats,
                   "warmup": opts.warmup} for design in BREAKDOWN_DESIGNS]
    return specs


def describe(spec: dict) -> str:
    """One line naming a measurement, e.g. "infer eager 512x512"."""
    parts = [spec["kind"], spec.get("design", "")]
    if "size" in spec:
        parts.append(fmt_size(spec["size"]))
    return " ".join(p for p in parts if p)


def row_key(spec: dict) -> str:
    return describe(spec)


def run_worker(spec: dict, opts: argparse.Namespace, cache_dir: str) -> dict:
    """Runs `measure.run_spec(spec)` in a fresh `python -m benchmarks.benchmark --worker` process.

    `cache_dir`: torch.compile's cache, one per run and image size, empty at the start of the run: round 1 compiles
    each size from scratch, later rounds find what it wrote (as a deployed model finds the cache of its last start).
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TORCHINDUCTOR_CACHE_DIR=cache_dir,
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    if opts.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = opts.omp_wait_policy.upper()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.benchmark", "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["no output"]
    return {"error": f"exit code {proc.returncode}: {lines[-1][:300]}"}


def worker_main(spec_json: str) -> None:
    """Runs one measurement in this process and prints its numbers as one tagged JSON line."""
    from benchmarks.measure import run_spec

    spec = json.loads(spec_json)
    for key in ("size",):
        if key in spec:
            spec[key] = tuple(spec[key])
    print(RESULT_TAG + json.dumps(run_spec(spec)), flush=True)


def run_benchmark(opts: argparse.Namespace) -> dict:
    """Every round runs every measurement once (each in its own process; even rounds in reverse order)."""
    runs: list[dict] = []
    info = machine_info()
    print(f"{opts.model}, {opts.threads} threads, fp32, {opts.rounds} round(s) x {opts.repeats} run(s), "
          f"{info['cpu']} ({info['cores']} cores, {info['cpu_capability']}), torch {info['torch']}, "
          f"load average {info['load_average_start']:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pvt-detr-benchmark-") as tmp:
        onnx_path = None
        if "onnx" in opts.infer:
            spec = {"kind": "export", "model": opts.model, "threads": opts.threads, "sizes": opts.sizes, "dir": tmp,
                    "atol": 1e-3, "spin": opts.omp_wait_policy == "active"}
            result = _run_and_log(spec, opts, "once", tmp)
            runs.append({"round": 0, "spec": spec, "result": result})
            chosen = result.get("chosen")
            onnx_path = result["exporters"][chosen]["path"] if chosen else None
        for r in range(opts.rounds):
            specs = plan_round(opts, first=r == 0, onnx_path=onnx_path)
            for spec in specs if r % 2 == 0 else specs[::-1]:
                runs.append({"round": r + 1, "spec": spec, "result": _run_and_log(spec, opts, f"{r + 1}", tmp)})
    info["load_average_end"] = os.getloadavg()[0]
    settings = {k: getattr(opts, k) for k in ("model", "threads", "rounds", "repeats", "warmup", "sizes", "only",
                                               "train_sizes", "train_repeats", "boxes", "omp_wait_policy")}
    settings["command"] = "python -m benchmarks.benchmark " + " ".join(opts.argv)
    return {"machine": info, "settings": settings, "runs": runs, "summary": summarise(runs)}


def _run_and_log(spec: dict, opts: argparse.Namespace, round_name: str, tmp: str) -> dict:
    t0 = time.perf_counter()
    result = run_worker(spec, opts, os.path.join(tmp, "inductor-" + fmt_size(spec.get("size", (0, 0)))))
    took = time.perf_counter() - t0
    what = result.get("error") or (f"median {result['median_s']:.3f} s" if "median_s" in result else "done")
    print(f"  round {round_name}: {describe(spec)}: {what} ({took:.0f} s)", file=sys.stderr, flush=True)
    return result


# ------------------------------------------------------------------------------------------------ summary


def stats(values: list[float]) -> dict | None:
    """{"median", "min", "max", "n"} of a non-empty list, else None."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: list[dict]) -> dict:
    """Pools every row's runs over the rounds: times, compile times, RSS as median [min - max]; FLOPs; errors."""
    pooled: dict[str, dict] = {}
    for run in runs:
        spec, result = run["spec"], run["result"]
        row = pooled.setdefault(row_key(spec), {"spec": spec, "times": [], "errors": [], "compile_first": [],
                                                "compile_s": [],
                                                "peak_rss": [], "rss_built": [], "breakdowns": []})
        if "error" in result:
            row["errors"].append(result["error"])
            continue
        if spec["kind"] == "matmul":
            row["times"] += [result["flops"] / t / 1e9 for t in result["times"]]  # GFLOP/s, not seconds
            continue
        row["times"] += result.get("times", [])
        for key in ("peak_rss", "rss_built"):
            if key in result:
                row[key].append(result[key])
        if "compile_s" in result:
            row["compile_first" if run["round"] == 1 else "compile_s"].append(result["compile_s"])
        if "flops" in result:
            row["flops"] = result["flops"]
        if spec["kind"] == "export":
            row["export"] = result
        if spec["kind"] == "breakdown":
            row["breakdowns"].append(result)
    summary = {}
    for key, row in pooled.items():
        out = {"spec": row["spec"], "errors": row["errors"]}
        for name in ("times", "compile_first", "compile_s", "peak_rss", "rss_built"):
            out[name] = stats(row[name])
        for name in ("flops", "export"):
            if name in row:
                out[name] = row[name]
        if row["breakdowns"]:
            out["breakdown"] = _median_breakdown(row["breakdowns"])
        summary[key] = out
    ours_flops = {fmt_size(s["spec"]["size"]): s["flops"] for s in summary.values()
                  if s["spec"]["kind"] == "infer" and s["spec"]["design"] in ("eager", "compiled", "onnx")
                  and "flops" in s}
    for s in summary.values():  # compiled and ONNX compute ours' forward: its FLOPs
        if s["spec"]["kind"] == "infer" and s["spec"]["design"] in ("compiled", "onnx") and "flops" not in s:
            s["flops"] = ours_flops.get(fmt_size(s["spec"]["size"]))
    return summary


def _median_breakdown(results: list[dict]) -> dict:
    """The median over rounds of each kind's seconds, of the plain median, and the first round's slowest ops."""
    kinds = results[0]["seconds"]
    return {"median_s": statistics.median(r["median_s"] for r in results),
            "seconds": {k: statistics.median(r["seconds"][k] for r in results) for k in kinds},
            "top_ops": results[0]["top_ops"]}


# ------------------------------------------------------------------------------------------------ report


def fmt_range(s: dict | None, unit: float = 1.0, digits: int = 3) -> str:
    """"median [min-max]" of a stats dict, divided by `unit`."""
    if not s:
        return "-"
    return f"{s['median'] / unit:.{digits}f} [{s['min'] / unit:.{digits}f}-{s['max'] / unit:.{digits}f}]"


def infer_rows(summary: dict, size) -> dict[str, dict]:
    return {s["spec"]["design"]: s for s in summary.values()
            if s["spec"]["kind"] == "infer" and tuple(s["spec"]["size"]) == tuple(size)}


def matmul_rate(summary: dict) -> dict | None:
    """Stats of the torch.mm 2048^2 GFLOP/s over all rounds."""
    row = next((s for s in summary.values() if s["spec"]["kind"] == "matmul"), None)
    return row["times"] if row else None


def speedup(rows: dict, design: str, reference: str = "official") -> float | None:
    a, b = rows.get(reference, {}).get("times"), rows.get(design, {}).get("times")
    return a["median"] / b["median"] if a and b else None


def gflops_rate(row: dict) -> float | None:
    return row["flops"] / row["times"]["median"] / 1e9 if row.get("flops") and row.get("times") else None


def format_inference(summary: dict, size, onnx_label: str, rounds: str) -> list[str]:
    rows = infer_rows(summary, size)
    mm = matmul_rate(summary)
    lines = [f"Inference {fmt_size(size)}, batch 1: seconds per forward, median [min-max] over {rounds}",
             f"{'design':<34} {'time s':>26} {'x official':>10} {'GFLOP':>7} {'GFLOP/s':>8} {'% of mm':>8}"]
    for design in INFER_DESIGNS:
        row = rows.get(design)
        if row is None:
            continue
        label = onnx_label if design == "onnx" else LABELS[design]
        if not row["times"]:
            lines.append(f"{label:<34} FAILED: {row['errors'][0] if row['errors'] else 'no runs'}")
            continue
        x = speedup(rows, design) if design != "linears" else None
        rate = gflops_rate(row)
        pct = f"{100 * rate / mm['median']:.0f} %" if rate and mm else "-"
        flops = f"{row['flops'] / 1e9:.1f}" if row.get("flops") else "-"
        lines.append(f"{label:<34} {fmt_range(row['times']):>26} {f'{x:.2f}x' if x else '-':>10} {flops:>7} "
                     f"{f'{rate:.1f}' if rate else '-':>8} {pct:>8}")
    compiled = rows.get("compiled")
    if compiled and compiled["compile_first"]:
        cached = compiled["compile_s"]
        first = compiled["compile_first"]["median"]
        lines.append(f"ours compiled, first call (compiles; not in the median): {first:.1f} s with an empty compile "
                     "cache (round 1)"
                     + (f", {fmt_range(cached, digits=1)} s with the cache of earlier rounds" if cached else ""))
    return lines


def format_export(summary: dict) -> tuple[str, list[str]]:
    """(label of the ONNX row, lines on the export)."""
    row = next((s for s in summary.values() if s["spec"]["kind"] == "export"), None)
    if row is None:
        return LABELS["onnx"], []
    if row["errors"]:
        return LABELS["onnx"], [f"ONNX export FAILED: {row['errors'][0]}"]
    export = row["export"]
    parts = []
    for name, e in export["exporters"].items():
        if "error" in e:
            parts.append(f"{name}: FAILED ({e['error'][:120]})")
        else:
            parts.append(f"{name}: export {e['export_s']:.1f} s, probe {e['probe_s']:.2f} s, max |diff| vs PyTorch "
                         f"{e['max_abs_diff']:.1e}")
    chosen = export["chosen"]
    label = f"ours ONNX ({chosen}) + onnxruntime" if chosen else LABELS["onnx"]
    return label, [f"ONNX export, once: {'; '.join(parts)}; rows use {chosen or 'none'} (probe: one run per size)"]


def format_train(summary: dict, rounds: str) -> list[str]:
    rows = {s["spec"]["design"]: s for s in summary.values() if s["spec"]["kind"] == "train"}
    if not rows:
        return []
    spec = next(iter(rows.values()))["spec"]
    sizes = " + ".join(fmt_size(s) for s in spec["sizes"])
    padded = fmt_size([32 * -(-max(s[i] for s in spec["sizes"]) // 32) for i in (0, 1)])  # to multiples of 32
    ref = rows.get("official", {})
    lines = [f"Training step, batch 2 ({sizes}, padded to {padded}; {spec['boxes']} boxes per image): "
             f"seconds per step and peak RSS, median [min-max] over {rounds}",
             f"{'design':<34} {'time s':>26} {'x official':>10} {'peak RSS GB':>21} {'after build GB':>15} "
             f"{'peak RSS / official (above build)':>34}"]
    gb = 1024**3
    for design in TRAIN_DESIGNS:
        row = rows.get(design)
        if row is None:
            continue
        label = LABELS[design]
        if not row["times"]:
            lines.append(f"{label:<34} FAILED: {row['errors'][0] if row['errors'] else 'no runs'}")
            continue
        x = speedup(rows, design)
        ratio = "-"
        if ref.get("peak_rss"):
            peak, built = row["peak_rss"]["median"], row["rss_built"]["median"]
            ref_peak, ref_built = ref["peak_rss"]["median"], ref["rss_built"]["median"]
            ratio = f"{peak / ref_peak:.2f} ({(peak - built) / (ref_peak - ref_built):.2f})"
        lines.append(f"{label:<34} {fmt_range(row['times'], digits=2):>26} {f'{x:.2f}x' if x else '-':>10} "
                     f"{fmt_range(row['peak_rss'], gb, 2):>21} {row['rss_built']['median'] / gb:>15.2f} {ratio:>34}")
    return lines


def aim_values(summary: dict) -> list[tuple[str, float | None, str, bool | None]]:
    """(aim, measured value, the aim as text, met) for every aim whose rows were measured."""
    out = []
    train = {s["spec"]["design"]: s for s in summary.values() if s["spec"]["kind"] == "train"}
    mm = matmul_rate(summary)
    for (what, design, size), goal in AIMS.items():
        if what == "rss":
            a, b = train.get("official", {}).get("peak_rss"), train.get(design, {}).get("peak_rss")
            if not (a and b):
                continue
            value = b["median"] / a["median"]
            text, met = f"<= {goal:.2f}", value <= goal
            out.append((f"peak RSS of a training step, {LABELS[design]} / official", value, text, met))
            continue
        rows = infer_rows(summary, size)
        if design not in rows:
            continue
        if what == "speedup":
            value = speedup(rows, design)
            label = f"{LABELS[design]} vs official design, {fmt_size(size)}"
        else:
            rate = gflops_rate(rows.get(design, {}))
            value = rate / mm["median"] if rate and mm else None
            label = f"{LABELS[design]} forward GFLOP/s / torch.mm's, {fmt_size(size)}"
        text = f">= {goal:.2f}x" if what == "speedup" else f">= {100 * goal:.0f} %"
        out.append((label, value, text, None if value is None else value >= goal))
    return out


def format_report(report: dict) -> str:
    """All tables of a run (fresh or loaded from --json)."""
    summary, settings, machine = report["summary"], report["settings"], report["machine"]
    rounds = f"{settings['rounds']} round(s) x {settings['repeats']} run(s)"
    lines = [f"{settings['model']}, {settings['threads']} threads, fp32, {machine['cpu']} ({machine['cores']} cores, "
             f"{machine.get('cpu_capability', '?')}), torch {machine['torch']}, load average "
             f"{machine['load_average_start']:.1f} at the start, {machine.get('load_average_end', float('nan')):.1f} "
             f"at the end", f"command: {settings['command']}", ""]
    onnx_label, export_lines = format_export(summary)
    for size in settings["sizes"]:
        if infer_rows(summary, size):
            lines += format_inference(summary, size, onnx_label, rounds) + [""]
    mm = matmul_rate(summary)
    if mm:
        lines.append(f"torch.mm 2048x2048 fp32 (the reference of '% of mm'): {fmt_range(mm, digits=1)} GFLOP/s "
                     f"over {mm['n']} runs in {settings['rounds']} process(es)")
    lines += export_lines
    if "hf" in settings["only"] and not any(s["spec"].get("design") == "hf" for s in summary.values()):
        lines.append("HF DETR-R50: skipped (transformers is not installed)")
    train = format_train(summary, f"{settings['rounds']} round(s) x {settings['train_repeats']} step(s)")
    if train:
        lines += [""] + train
    breakdowns = {LABELS[s["spec"]["design"]]: s["breakdown"] for s in summary.values()
                  if s["spec"]["kind"] == "breakdown" and "breakdown" in s}
    if breakdowns:
        size = fmt_size(settings["sizes"][0])
        lines += ["", f"Forward {size} by kind of op (torch.profiler self CPU time, median over rounds):",
                  format_breakdown(breakdowns)]
    aims = aim_values(summary)
    if aims:
        lines += ["", f"{'aim (same run)':<70} {'measured':>9} {'aim':>9} {'met':>4}"]
        for label, value, text, met in aims:
            shown = "-" if value is None else (f"{100 * value:.0f} %" if "%" in text else
                                               f"{value:.2f}{'x' if 'x' in text else ''}")
            lines.append(f"{label:<70} {shown:>9} {text:>9} {'-' if met is None else 'yes' if met else 'NO':>4}")
    errors = [f"{key}: {e}" for key, s in summary.items() for e in s["errors"]]
    if errors:
        lines += ["", "errors:", *errors]
    return "\n".join(lines)


def show(path: str) -> dict:
    """Prints the tables of a run saved with --json; SystemExit with one line for a missing or malformed file."""
    try:
        report = json.loads(Path(path).read_text())
        report["summary"] = summarise(report["runs"])
        text = format_report(report)
    except OSError as err:
        raise SystemExit(f"{path}: cannot read it ({err.strerror})") from None
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise SystemExit(f"{path}: not a run saved by `benchmarks.benchmark --json` ({type(err).__name__}: {err})") \
            from None
    print(text)
    return report


# ------------------------------------------------------------------------------------------------ command line


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m benchmarks.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pvt_small", help="PVT variant (pvt_detr.list_backbones())")
    p.add_argument("--threads", type=int, default=2, help="torch, OpenMP, MKL and onnxruntime intra-op threads")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every measurement once")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per inference process")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards before them (after compiling)")
    p.add_argument("--only", default=",".join(MEASUREMENTS),
                   help=f"comma-separated subset of {','.join(MEASUREMENTS)} (default: all)")
    p.add_argument("--sizes", type=size_list, default=[(512, 512), (800, 1216)], help="inference HxW, comma-separated")
    p.add_argument("--train_sizes", type=size_list, default=[(800, 1216), (736, 1088)],
                   help="the training batch: one HxW per image, padded together")
    p.add_argument("--train_repeats", type=int, default=2, help="timed training steps per process (after 1 warm-up)")
    p.add_argument("--boxes", type=int, default=8, help="random target boxes per training image")
    p.add_argument("--omp_wait_policy", default="passive", choices=["passive", "active", "inherit"],
                   help="OMP_WAIT_POLICY of the measuring processes (and onnxruntime spinning only with active)")
    p.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                   help="save the run (default PATH: benchmarks/results/<cpu model>-<model>-<threads>t-fp32.json)")
    p.add_argument("--show", default=None, metavar="PATH", help="print the tables of a saved run (measures nothing)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_parser()
    opts = parser.parse_args(argv)
    if opts.worker:
        worker_main(opts.worker)
        return None
    if opts.show:
        return show(opts.show)
    opts.argv = argv
    opts.only = [m.strip() for m in opts.only.split(",") if m.strip()]
    unknown = [m for m in opts.only if m not in MEASUREMENTS]
    if unknown:
        parser.error(f"--only: unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MEASUREMENTS)}")
    for name in ("threads", "rounds", "repeats", "train_repeats", "boxes"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if len(opts.train_sizes) != 2:
        parser.error("--train_sizes needs two sizes (a batch of 2)")
    if opts.model not in list_backbones():
        parser.error(f"--model {opts.model!r} is not one of {', '.join(list_backbones())}")
    opts.infer = [d for d in INFER_DESIGNS if d in opts.only]
    if "hf" in opts.infer and importlib.util.find_spec("transformers") is None:
        opts.infer.remove("hf")
    report = run_benchmark(opts)
    print(format_report(report), flush=True)
    if opts.json is not None:
        path = Path(opts.json) if opts.json else results_path(report["machine"]["cpu"], opts.model, opts.threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"saved {path}", flush=True)
    return report


if __name__ == "__main__":
    main()
