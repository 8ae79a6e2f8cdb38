"""The benchmark (benchmarks/): FLOP counting, result-file names, pooling and aims, --show, one tiny real run."""

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks import benchmark
from benchmarks.measure import count_flops, run_spec
from pvt_detr.attention import MultiheadAttention

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_flop_count_of_attention_equals_a_hand_count():
    mha = MultiheadAttention(embed_dim=8, num_heads=2).eval()
    q, kv = torch.randn(1, 5, 8), torch.randn(1, 7, 8)  # (B, N_q, C), (B, N_k, C)
    flops = count_flops(lambda: mha(q, kv, kv), mha)
    projections = 2 * 5 * 8 * 8 + 2 * (2 * 7 * 8 * 8) + 2 * 5 * 8 * 8  # q, k, v, out: 2 N C_in C_out each
    attention = 2 * (2 * 1 * 2 * 5 * 7 * 4)  # q k^T and attn v: 2 B h N_q N_k d each
    assert flops == projections + attention == 4192
    assert all(p.requires_grad for p in mha.parameters())  # restored after counting


def test_results_file_is_named_by_the_cpu_model_from_cpuinfo():
    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t: fpu\n"
    cpu = benchmark.cpu_model(cpuinfo)
    assert cpu == "AMD EPYC 9R14 96-Core Processor"
    path = benchmark.results_path(cpu, "pvt_small", 2)
    assert path.name == "amd-epyc-9r14-96-core-processor-pvt_small-2t-fp32.json"
    assert path.parent == BENCHMARKS / "results"


def test_cpu_model_falls_back_to_platform_processor(monkeypatch):
    monkeypatch.setattr(benchmark.platform, "processor", lambda: "Some CPU (R) 7")
    assert benchmark.cpu_model("processor\t: 0\n") == "Some CPU (R) 7"
    assert benchmark.slug("Some CPU (R) 7") == "some-cpu-r-7"


def _spec(kind, design=None, size=None, **extra):
    spec = {"kind": kind, "model": "pvt_tiny", "threads": 2, **extra}
    if design:
        spec["design"] = design
    if size:
        spec["size"] = list(size)
    return spec


def _report(tmp_path=None) -> dict:
    """A saved run with two rounds of made-up numbers."""
    gib = 1024**3
    runs = []
    for r, slow in ((1, 1.0), (2, 1.2)):
        runs += [
            {"round": r, "spec": _spec("matmul"), "result": {"times": [0.1, 0.1 * slow], "flops": 2 * 2048**3}},
            {"round": r, "spec": _spec("infer", "eager", (512, 512)),
             "result": {"times": [0.5 * slow], "flops": 30e9} if r == 1 else {"times": [0.5 * slow]}},
            {"round": r, "spec": _spec("infer", "compiled", (512, 512)),
             "result": {"times": [0.25 * slow], "compile_s": 100.0 if r == 1 else 20.0}},
            {"round": r, "spec": _spec("infer", "official", (512, 512)),
             "result": {"times": [0.6 * slow], "flops": 31e9} if r == 1 else {"times": [0.6 * slow]}},
            {"round": r, "spec": _spec("train", "ours", sizes=[[800, 1216], [736, 1088]], boxes=8),
             "result": {"times": [10.0 * slow], "peak_rss": 3 * gib, "rss_built": 1 * gib}},
            {"round": r, "spec": _spec("train", "official", sizes=[[800, 1216], [736, 1088]], boxes=8),
             "result": {"times": [20.0 * slow], "peak_rss": 10 * gib, "rss_built": 1 * gib}},
        ]
    settings = {"model": "pvt_tiny", "threads": 2, "rounds": 2, "repeats": 1, "warmup": 1, "sizes": [[512, 512]],
                "only": ["eager", "compiled", "official", "train"], "train_sizes": [[800, 1216], [736, 1088]],
                "train_repeats": 1, "boxes": 8, "omp_wait_policy": "passive", "command": "python -m ..."}
    machine = {"cpu": "Test CPU", "cores": 2, "torch": "x", "load_average_start": 0.5, "load_average_end": 0.5}
    return {"machine": machine, "settings": settings, "runs": runs}


def test_rounds_are_pooled_and_aims_computed_against_the_official_design():
    summary = benchmark.summarise(_report()["runs"])
    eager = summary["infer eager 512x512"]
    assert eager["times"] == {"median": 0.55, "min": 0.5, "max": 0.6, "n": 2}
    assert eager["flops"] == 30e9
    assert summary["infer compiled 512x512"]["flops"] == 30e9  # ours' FLOPs, counted by the eager row
    assert summary["infer compiled 512x512"]["compile_first"]["median"] == 100.0
    assert summary["infer compiled 512x512"]["compile_s"]["median"] == 20.0
    mm = benchmark.matmul_rate(summary)
    assert mm["n"] == 4 and mm["max"] == pytest.approx(2 * 2048**3 / 0.1 / 1e9)
    aims = {label: (value, met) for label, value, _, met in benchmark.aim_values(summary)}
    assert aims["ours compiled vs official design, 512x512"] == (pytest.approx(0.66 / 0.275), True)
    assert aims["ours eager vs official design, 512x512"] == (pytest.approx(0.66 / 0.55), True)
    pct = aims["ours compiled forward GFLOP/s / torch.mm's, 512x512"][0]
    assert pct == pytest.approx(30e9 / 0.275 / 1e9 / (2 * 2048**3 / 0.1 / 1e9))
    rss = aims["peak RSS of a training step, ours (grad checkpointing on) / official"]
    assert rss == (pytest.approx(0.3), True)
    assert not any("800x1216" in label for label in aims)  # sizes not measured have no aim


def test_show_reprints_a_saved_run_and_names_a_bad_file(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_report()))
    benchmark.main(["--show", str(path)])
    out = capsys.readouterr().out
    assert re.search(r"ours compiled\s+0\.275 \[0\.250-0\.300\]\s+2\.40x\s+30\.0\s+109\.1\s+63 %", out)
    assert "100.0 s with an empty compile cache (round 1), 20.0 [20.0-20.0] s with the cache" in out
    assert re.search(r"ours \(grad checkpointing on\)\s+11\.00 \[10\.00-12\.00\]\s+2\.00x\s+3\.00 \[3\.00-3\.00\]"
                     r"\s+1\.00\s+0\.30 \(0\.22\)", out)

    bad = tmp_path / "bad.json"
    bad.write_text('{"runs": [')
    with pytest.raises(SystemExit) as err:
        benchmark.main(["--show", str(bad)])
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as err:
        benchmark.main(["--show", str(tmp_path / "missing.json")])
    assert "missing.json: cannot read it" in str(err.value) and "\n" not in str(err.value)


def test_benchmark_code_uses_public_apis_only():
    private = re.compile(r"torch(\.\w+)*\._[A-Za-z]|torch\.ops\.mkldnn|_python_dispatch")  # torch._x, torch.utils._x
    for path in BENCHMARKS.glob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not private.search(line), f"{path.name}:{number}: {line.strip()}"


def test_a_training_step_reports_times_and_peak_rss():
    spec = {"kind": "train", "design": "ours", "model": "pvt_nano", "threads": 1, "sizes": [[64, 96], [64, 64]],
            "boxes": 2, "repeats": 1, "warmup": 1}
    result = run_spec(spec)
    assert len(result["times"]) == 1 and result["times"][0] > 0
    assert result["peak_rss"] >= result["rss_built"] >= result["rss_import"] > 0


@pytest.mark.slow
def test_a_tiny_run_end_to_end(tmp_path, capsys):
    path = tmp_path / "tiny.json"
    report = benchmark.main(["--model", "pvt_nano", "--sizes", "64x64", "--rounds", "1", "--repeats", "1",
                             "--only", "eager", "--threads", "1", "--json", str(path)])
    row = report["summary"]["infer eager 64x64"]
    assert row["errors"] == [] and row["times"]["n"] == 1 and row["times"]["median"] > 0
    assert row["flops"] > 0
    assert benchmark.matmul_rate(report["summary"])["median"] > 0
    saved = json.loads(path.read_text())
    assert saved["settings"]["sizes"] == [[64, 64]] and saved["machine"]["cpu"]
    capsys.readouterr()
    benchmark.main(["--show", str(path)])
    assert re.search(r"ours eager\s+\d+\.\d{3} \[", capsys.readouterr().out)
