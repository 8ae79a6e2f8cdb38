"""The benchmark CLI runs and reports well-formed numbers; the official-design baseline computes what we compute."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import benchmark
from benchmarks.official_design import OfficialMatcher, build_official
from pvt_detr import load_detr_checkpoint, load_pvt_checkpoint
from pvt_detr.matcher import HungarianMatcher
from tests.conftest import ROOT

TINY = {"backbone": "pvt_tiny", "hidden_dim": 64, "nheads": 4, "enc_layers": 1, "dec_layers": 2,
        "dim_feedforward": 128, "num_queries": 10, "num_classes": 5, "drop_path": 0.0, "dropout": 0.0}


def _run_cli(module: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_matcher_measurement_reports_positive_well_formed_numbers(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run_cli("benchmarks.benchmark", "--only", "matcher", "--repeats", "2", "--warmup", "0",
                    "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "matcher bs2 Q100 T20/img" in proc.stdout and "baseline RSS" in proc.stdout
    report = json.loads(out.read_text())
    assert report["model"] == "pvt_small" and report["machine"]["threads"] == 1
    r = report["results"]["ours"]["matcher"]
    assert len(r["runs"]) == 2 and all(t > 0 for t in r["runs"])
    assert 0 < r["min"] <= r["median"] <= r["max"]
    assert 0 < r["criterion"]["min"] <= r["criterion"]["median"] <= r["criterion"]["max"]
    assert 0 < r["rss_import_mb"] <= r["rss_built_mb"] <= r["peak_rss_mb"]


def test_library_cli_points_to_the_comparison_driver_for_the_official_design():
    proc = _run_cli("benchmarks.benchmark", "--design", "official", "--only", "matcher")
    assert proc.returncode != 0 and "benchmarks.compare" in proc.stderr


def test_flop_count_matches_hand_count_and_both_designs_agree():
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(3, 5, 8)
    assert benchmark._count_flops(lambda: lin(x)) == 2 * 3 * 5 * 8 * 16
    q, k = torch.randn(1, 2, 7, 4), torch.randn(1, 2, 3, 4)
    sdpa = benchmark._count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k))
    assert sdpa == 2 * (2 * 2 * 7 * 3 * 4)  # q k^T and attn v
    args = benchmark.model_args(**TINY)
    samples = benchmark._images(1, (96, 160))
    counts = []
    for build in (benchmark.build_ours, build_official):
        model = build(args)[0].eval()
        with torch.no_grad():
            counts.append(benchmark._count_flops(lambda m=model: m(samples)))
    assert counts[0] == counts[1] > 0


def _same_weights():
    """(ours, official) DETR models with identical weights, loaded through our checkpoint converters."""
    args = benchmark.model_args(**TINY)
    official, official_criterion = build_official(args)
    ours, criterion = benchmark.build_ours(args)
    with torch.no_grad():  # non-trivial LayerNorm affines and biases, so that every tensor matters
        for m in official.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
    report = load_pvt_checkpoint(ours.backbone, official.backbone.state_dict())
    assert sorted(report.unused) == ["cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight"]
    report = load_detr_checkpoint(ours, official.state_dict())
    assert not report.skipped and all(k.startswith("backbone.") for k in report.missing + report.unused)
    return ours.eval(), official.eval(), criterion, official_criterion


@pytest.mark.parametrize("hw", [(224, 224), (160, 288)])
def test_official_design_backbone_gives_our_outputs(hw):
    ours, official, _, _ = _same_weights()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        expected = official.backbone(x)
        got = ours.backbone.forward_features(x)
    assert [tuple(e.shape) for e in expected[-1:]] == [tuple(g.shape) for g in got]
    torch.testing.assert_close(got[-1], expected[-1], rtol=1e-5, atol=1e-5 * expected[-1].abs().max().item())


def test_official_design_detector_and_losses_equal_ours():
    ours, official, criterion, official_criterion = _same_weights()
    images = [torch.randn(3, 128, 160), torch.randn(3, 128, 160)]  # the official PVT has no padding masks
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.4], [0.6, 0.5, 0.3, 0.3]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    with torch.no_grad():
        a, b = official(images), ours(images)
        la, lb = official_criterion(a, targets), criterion(b, targets)
    torch.testing.assert_close(b["pred_logits"], a["pred_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b["pred_boxes"], a["pred_boxes"], rtol=1e-4, atol=1e-4)
    assert set(lb) == set(la)
    for key in lb:
        torch.testing.assert_close(lb[key], la[key].to(lb[key].dtype), rtol=1e-4, atol=1e-4)


def test_official_matcher_equals_ours():
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 100, 92, generator=g), "pred_boxes": torch.rand(2, 100, 4, generator=g)}
    targets = benchmark._targets(2, 20)
    for (i, j), (k, m) in zip(HungarianMatcher()(outputs, targets), OfficialMatcher()(outputs, targets)):
        assert torch.equal(i, k) and torch.equal(j, m)


def _fake_report(ref_time: float, cand_time: float) -> dict:
    flops = {"flops_512": 50e9, "flops_800": 250e9, "flops_train": 300e9, "backbone_flops_512": 40e9,
             "backbone_flops_800": 200e9, "matmul_gflops": 100.0, "matmul_gflops_onednn": 200.0}
    run = lambda t: {"median": t, "min": t, "max": t, "matmul_gflops": 100.0, "matmul_gflops_onednn": 200.0}  # noqa: E731
    return {"ours": {"infer512": run(cand_time), "flops": flops},
            "official": {"infer512": run(ref_time), "flops": flops}}


def test_ceilings_give_the_rate_a_target_asks_against_the_best_matmul():
    # official 0.5 s for 50 GFLOP (100 GFLOP/s); 2x asks 50 GFLOP in 0.25 s = 200 GFLOP/s = the 200 GFLOP/s matmul.
    lines = benchmark.format_ceilings(_fake_report(0.5, 0.4), "official", "ours", {"infer512": 2.0})
    assert "(200 GFLOP/s)" in lines[0]
    row = lines[2].split()
    assert row[3:5] == ["100", "(50%)"] and row[5:7] == ["125", "(62%)"]  # official, ours (50 GFLOP / 0.4 s)
    assert row[7:] == ["2.00x", "200", "(100%)", "yes"]
    lines = benchmark.format_ceilings(_fake_report(0.5, 0.4), "official", "ours", {"infer512": 2.5})
    assert lines[2].split()[7:] == ["2.50x", "250", "(125%)", "NO"]
    assert benchmark.format_ceilings(_fake_report(0.5, 0.4), "official", "ours", {}) == []


def test_show_reprints_a_saved_report_and_names_a_bad_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "pvt_small", "machine": {"threads": 2}, "rounds": 1, "repeats": 1,
                                "results": _fake_report(0.5, 0.25), "targets": {"infer512": 1.9}}))
    proc = _run_cli("benchmarks.benchmark", "--show", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "2.00x  >=1.90x  yes" in proc.stdout and "190 (95%)" in proc.stdout
    path.write_text("{not json")
    proc = _run_cli("benchmarks.benchmark", "--show", str(path))
    assert proc.returncode != 0 and f"{path}: not a benchmark report" in proc.stderr
    assert "Traceback" not in proc.stderr
