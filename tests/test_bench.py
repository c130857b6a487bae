"""sdkit.bench: the CPU smoke test of the benchmark, its FLOP count and its results table."""

import json

import pytest
import torch

from sdkit import bench, checks


def test_smoke_cli_prints_and_returns_figures(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--json", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "stock:" in printed and "fast:" in printed and "it/s" in printed
    out = json.loads(out_file.read_text())
    assert out["smoke"] is True
    results = {r["variant"]: r for r in out["results"]}
    assert set(results) == {"stock", "fast"}
    for r in results.values():
        assert set(bench.RESULT_KEYS) <= set(r)
        assert r["it_per_s"] > 0 and r["s_per_image"] > 0 and r["peak_memory_gb"] > 0
        assert (r["height"], r["width"], r["steps"]) == (64, 64, 2)
        assert 0 < r["tflop_per_step"] < 1e-2  # the shrunken UNet
        assert r["share_of_peak"] is None  # no peak known for a CPU
    assert results["fast"]["settings"]["channels_last"] is True
    assert "Fused" in results["fast"]["settings"]["attention"]
    assert out["speedup"] == pytest.approx(results["fast"]["it_per_s"]
                                           / results["stock"]["it_per_s"])
    for key in ("torch", "diffusers", "device", "driver", "date"):
        assert out["environment"][key]


def test_sd15_flops_per_guided_step():
    # the figure the share-of-peak column rests on: 1.61 TFLOP for SD 1.5 at 512x512, CFG on
    tflop = bench.unet_tflop_per_step(bench.SD15_UNET, 512, 512, guidance=True)
    assert tflop == pytest.approx(1.61, abs=0.01)
    # without guidance the batch halves, and so does the work
    assert bench.unet_tflop_per_step(bench.SD15_UNET, 512, 512, guidance=False) == \
        pytest.approx(tflop / 2, rel=1e-6)


def test_sd15_configs_are_sd15():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**bench.SD15_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD 1.5's UNet


def test_fast_settings_keep_the_unet_output():
    stock = bench.build_pipeline(smoke=True)
    fast = bench.build_pipeline(smoke=True)
    applied = bench.apply_fast_settings(fast, compile=False)
    assert applied["compile"] is False
    g = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([999, 999])
    with torch.no_grad():
        a = stock.unet(latents, t, encoder_hidden_states=text).sample
        b = fast.unet(latents.to(memory_format=torch.channels_last), t,
                      encoder_hidden_states=text).sample
    assert a.shape == (2, 4, 8, 8)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_full_benchmark_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(checks.SdkitInputError, match="--smoke"):
        bench.run(smoke=False, device="cpu")


def _fake(variant, it_s, device="NVIDIA H100 80GB HBM3"):
    r = dict(variant=variant, dtype="float16", height=512, width=512, steps=50, it_per_s=it_s,
             s_per_image=50 / it_s + 0.1, peak_memory_gb=2.5, share_of_peak=0.1,
             settings={"compile": "max-autotune"})
    env = dict(date="2026-01-01", device=device, driver="570.1", torch="2.13.0", cuda="12.8",
               diffusers="0.42.1")
    return {"results": [r], "environment": env, "smoke": False}


def test_write_results_appends_and_replaces(tmp_path):
    doc = tmp_path / "benchmarks.md"
    table = "| date | ... |\n|---|"
    doc.write_text(f"# B\n\n{bench.RESULTS_START}\n{table}\n{bench.RESULTS_END}\nend\n")
    bench.write_results(_fake("fast", 100.0), doc)
    bench.write_results(_fake("stock", 50.0), doc)
    text = doc.read_text()
    assert "| 100.00 |" in text and "| 50.00 |" in text and text.endswith("end\n")
    bench.write_results(_fake("fast", 130.0), doc)  # same GPU, versions and variant: replaced
    text = doc.read_text()
    assert "| 130.00 |" in text and "| 100.00 |" not in text and "| 50.00 |" in text
    bench.write_results(_fake("fast", 90.0, device="NVIDIA A100-SXM4-80GB"), doc)
    assert doc.read_text().count("| fast |") == 2
    with pytest.raises(checks.SdkitInputError, match="markers"):
        (tmp_path / "plain.md").write_text("no table")
        bench.write_results(_fake("fast", 1.0), tmp_path / "plain.md")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", None), ("NVIDIA GeForce RTX 3060", None)])
def test_peak_lookup_by_gpu_name(name, peak):
    assert bench.peak_tflops_for(name) == peak
