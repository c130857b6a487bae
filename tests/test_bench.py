"""sdkit.generation and sdkit.bench: weights, memory, FLOPs, the CPU smoke test of the benchmark
and its results table. (Bad inputs: tests/test_bad_inputs.py.)"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdkit import bench, generation, images, pipeline
from sdkit.latents import unet_flops


def _meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**dict(config))


# ------------------------------------------------------------------------------ FLOPs


def test_sd15_flops_per_guided_step():
    # the figure the share-of-peak column rests on: 1.61 TFLOP for SD 1.5 at 512x512, CFG on
    tflop = generation.unet_tflop_per_step(generation.SD15_UNET, 512, 512,
                                           generation.SD15_VAE_SCALE_FACTOR)
    assert generation.SD15_VAE_SCALE_FACTOR == 8
    assert tflop == pytest.approx(1.61, abs=0.01)
    # without guidance the batch halves, and so does the work
    assert generation.unet_tflop_per_step(generation.SD15_UNET, 512, 512, 8, guidance=False) \
        == pytest.approx(tflop / 2, rel=1e-9)


def test_flops_are_counted_at_the_latent_size_of_the_vae(tiny_pipe):
    # the tiny pipeline's VAE shrinks by 4 (like the toy's): 64 px -> 16 x 16 latents, the
    # latents its pipeline really denoises. Counting at 64 / 8 = 8 x 8 was the old bug.
    f = images.vae_scale_factor(tiny_pipe.vae)
    seq_len = tiny_pipe.tokenizer.model_max_length
    tflop = generation.unet_tflop_per_step(tiny_pipe.unet.config, 64, 64, f, seq_len=seq_len)
    unet = _meta_unet(tiny_pipe.unet.config)
    dim = tiny_pipe.unet.config.cross_attention_dim
    assert f == 4
    assert tflop == 2 * unet_flops(unet, (4, 16, 16), (seq_len, dim)) / 1e12
    at_8x8 = generation.unet_tflop_per_step(tiny_pipe.unet.config, 64, 64, 8, seq_len=seq_len)
    # 4x the latent pixels: convolutions 4x, self-attention more, the text projections the same
    assert 3.5 < tflop / at_8x8 < 5.0


def test_smoke_cli_prints_and_returns_figures(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--json", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "stock:" in printed and "fast:" in printed and "it/s" in printed
    out = json.loads(out_file.read_text())
    assert out["smoke"] is True
    results = {r["variant"]: r for r in out["results"]}
    assert set(results) == {"stock", "fast"}
    # the smoke model: 64 px through a VAE of 4 blocks (factor 8) = 8 x 8 latents, 77 tokens
    want = 2 * unet_flops(_meta_unet(bench.SMOKE_UNET), (4, 8, 8), (77, 32)) / 1e12
    for r in results.values():
        assert set(bench.RESULT_KEYS) <= set(r)
        assert (r["height"], r["width"], r["steps"]) == (64, 64, 2)
        assert r["tflop_per_step"] == want
        assert r["share_of_peak"] is None  # no peak known for a CPU
        assert r["s_per_image"] >= r["steps"] / r["it_per_s"] * 0.5  # an image takes its steps
    assert results["fast"]["settings"]["channels_last"] is True
    assert "Fused" in results["fast"]["settings"]["attention"]
    assert out["speedup"] == pytest.approx(results["fast"]["it_per_s"]
                                           / results["stock"]["it_per_s"])
    for key in ("torch", "diffusers", "device", "driver", "date"):
        assert out["environment"][key]


# ------------------------------------------------------------------------------ weights, memory


def test_sd15_parameter_counts_are_sd15s():
    # the published sizes of stable-diffusion-v1-5's three parts
    assert generation.sd15_parameter_counts() == {
        "unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_parameter_counts_are_the_shipped_files_tensors(toy_pipe):
    """An independent count: the elements of every tensor in data/toy-sd/*/*.safetensors,
    read from the files' headers."""
    saved = {}
    for f in sorted(pipeline.TOY_DIR.glob("*/*.safetensors")):
        with safe_open(str(f), "pt") as st:
            saved[f.parent.name] = sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    assert set(saved) == {"unet", "vae", "text_encoder"}
    assert generation.parameter_counts(toy_pipe) == saved


# ------------------------------------------------------------------------------ the exercise

SOLUTION = Path(__file__).resolve().parent.parent / "notebooks" / "solutions" / \
    "07_full_generation.py"


def test_reference_solution_passes_the_fp16_checker(capsys):
    namespace = {}  # the solution imports what it reads
    exec(SOLUTION.read_text(encoding="utf-8"), namespace)
    assert generation.check_sd15_fp16_mib(namespace["sd15_fp16_mib"]) is True
    assert "Right" in capsys.readouterr().out
    # within 1 MiB counts (a learner may round)
    assert generation.check_sd15_fp16_mib(round(namespace["sd15_fp16_mib"])) is True


def test_fp16_checker_rejects_the_typical_mistakes_with_a_hint(capsys):
    counts = generation.sd15_parameter_counts()
    n = sum(counts.values())
    for wrong, hint in (
            (n * 4 / 2**20, "float32"),  # 4 bytes per weight
            (n * 2 / 1e6, "MB (10**6 bytes)"),  # MB, not MiB
            (counts["unet"] * 2 / 2**20, "vae and text_encoder are left out"),  # the UNet only
            ((counts["unet"] + counts["vae"]) * 2 / 2**20, "text_encoder is left out"),
            (n * 4 / 1e6, "float32"),  # two mistakes at once: both named
            (n * 2, "that is bytes"),
            (1234.0, "sd15_parameter_counts()")):  # no known mistake: how to compute it
        assert generation.check_sd15_fp16_mib(wrong) is False, wrong
        out = capsys.readouterr().out
        assert "Not quite" in out and hint in out, (wrong, out)
    generation.check_sd15_fp16_mib(n * 4 / 1e6)
    assert "MB" in capsys.readouterr().out


def test_fp16_checker_unsolved_and_bad_answers_print_and_never_raise(capsys):
    assert generation.check_sd15_fp16_mib(None) is False
    assert "not solved yet" in capsys.readouterr().out
    for bad in ("2034", True, float("nan"), [2034]):
        assert generation.check_sd15_fp16_mib(bad) is False
        assert "expected a number of MiB" in capsys.readouterr().out


def test_peak_memory_counts_bytes():
    before = generation.peak_memory_bytes("cpu")
    big = torch.ones(300 * 2**20 // 4)  # 300 MiB, touched
    assert generation.peak_memory_bytes("cpu") >= max(before, big.numel() * 4)


def test_fast_settings_keep_the_unet_output():
    stock = bench.build_pipeline(smoke=True)
    fast = bench.build_pipeline(smoke=True)
    applied = generation.apply_fast_settings(fast, compile=False)
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


# ------------------------------------------------------------------------------ the results table


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
    bench._write_results(_fake("fast", 100.0), doc)
    bench._write_results(_fake("stock", 50.0), doc)
    text = doc.read_text()
    assert "| 100.00 |" in text and "| 50.00 |" in text and text.endswith("end\n")
    bench._write_results(_fake("fast", 130.0), doc)  # same GPU, versions and variant: replaced
    text = doc.read_text()
    assert "| 130.00 |" in text and "| 100.00 |" not in text and "| 50.00 |" in text
    bench._write_results(_fake("fast", 90.0, device="NVIDIA A100-SXM4-80GB"), doc)
    assert doc.read_text().count("| fast |") == 2


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", None), ("NVIDIA GeForce RTX 3060", None)])
def test_peak_lookup_by_gpu_name(name, peak):
    assert bench._peak_tflops_for(name) == peak
