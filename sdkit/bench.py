"""How fast does Stable Diffusion 1.5 run here? Stock diffusers vs the kit's fastest settings.

    python -m sdkit.bench                 # on a CUDA GPU: SD 1.5 at 512x512, 50 steps, guidance on
    python -m sdkit.bench --write         # ... and record the figures in docs/benchmarks.md
    python -m sdkit.bench --smoke         # anywhere: a shrunken model, 64x64, 2 steps (CI)

The model is Stable Diffusion 1.5's exact architecture (the UNet2DConditionModel, AutoencoderKL
and CLIPTextModel configs are written out in ``sdkit.generation``, so nothing is downloaded;
the tokenizer is the toy model's, in the repository) with random weights:
speed does not depend on the weights' values. Two variants are measured in one run, one after
the other on the same machine:

- ``stock``: the diffusers pipeline as it comes (float16 on a GPU, diffusers' default
  attention processor, which calls PyTorch's scaled_dot_product_attention);
- ``fast``: the kit's fastest settings: float16 or bfloat16, SDPA, fused QKV projections
  (``fuse_qkv_projections``), channels_last memory layout, and on CUDA ``torch.compile`` of the
  UNet and the VAE decoder with CUDA graphs (``mode="max-autotune"``; without CUDA graphs where
  capturing fails, which the result then says).

For each: iterations (denoising steps) per second, seconds per image (prompt to PIL image),
peak memory, and the share of the GPU's dense fp16/bf16 peak that the UNet uses (its FLOPs per
guided step: ``sdkit.generation.unet_tflop_per_step``, which runs the kit's one FLOP counter,
``sdkit.latents.unet_flops``, on the meta device at the latent size the pipeline's VAE gives:
1.61 TFLOP for SD 1.5 at 512x512). On a GPU the stock pipeline is also measured with
``enable_model_cpu_offload`` and ``enable_sequential_cpu_offload`` for their peak memory.

Left out: the safety checker (random weights; it is the same cost in both variants), other
schedulers (DDIM with SD 1.5's schedule: exactly one guided UNet call per step), batch sizes
other than 1, and third-party compilers (stable-fast, TensorRT): their published figures are
quoted in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from . import checks, generation
from .device import check_memory, get_device
from .images import unet_memory_bytes, vae_memory_bytes, vae_scale_factor
from .pipeline import TOY_DIR

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
RESULTS_START = "<!-- sdkit.bench results: start -->"
RESULTS_END = "<!-- sdkit.bench results: end -->"

# --smoke: the same classes shrunk so that two variants run on a laptop CPU in seconds.
SMOKE_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=4, norm_num_groups=8,
)
SMOKE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
    block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, scaling_factor=0.18215,
)
SMOKE_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)

PROMPT = "a red circle on the left"
# Dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100": 989.0, "H200": 989.0, "H100 PCIe": 756.0,
               "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
# Published comparison figures (SD 1.5, 512x512, H100), quoted in docs/benchmarks.md.
PUBLISHED_IT_S = {"stock diffusers": 54.5, "torch.compile": 66.0, "stable-fast": 104.6}
GOALS = {"fast_it_s": 120.0, "speedup_vs_stock": 2.0, "peak_gb_default": 3.0,
         "peak_gb_offload": 1.0}
RESULT_KEYS = ("variant", "device", "dtype", "height", "width", "steps", "it_per_s",
               "s_per_image", "peak_memory_gb", "memory_kind", "tflop_per_step",
               "share_of_peak", "settings")


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokenizer():
    """The toy model's CLIP tokenizer (the kit's small vocabulary), padding to SD's 77 tokens;
    the token ids only index the embedding table, so the vocabulary does not change the timing."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOY_DIR / "tokenizer", model_max_length=77)


def build_pipeline(smoke: bool = False, device="cpu", dtype=torch.float32, init_device=None):
    """A StableDiffusionPipeline with SD 1.5's architecture (or the smoke-test one) and random
    weights, on ``device`` in ``dtype``. ``init_device`` is where the random weights are drawn
    (the GPU draws 1 billion of them in a blink).

    Introduced in notebooks/07_full_generation.ipynb.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    with torch.device(init_device or device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel(**(SMOKE_UNET if smoke else generation.SD15_UNET))
        vae = AutoencoderKL(**(SMOKE_VAE if smoke else generation.SD15_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(**(SMOKE_TEXT_ENCODER if smoke
                                                       else generation.SD15_TEXT_ENCODER)))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**generation.SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(dtype) warns even when nothing must stay fp32
    try:
        return pipe.to(device=device, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def _one_image(pipe, steps: int, height: int, width: int, device: torch.device):
    """(seconds for the whole call, seconds per step between the first and the last step)."""
    marks = {}

    def on_step_end(_pipe, i, _t, kwargs):
        if i in (0, steps - 1):
            _sync(device)
            marks[i] = time.perf_counter()
        return kwargs

    _sync(device)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights may give NaN pixels: same cost
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=height, width=width,
             generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=on_step_end)
    _sync(device)
    total = time.perf_counter() - start
    per_step = ((marks[steps - 1] - marks[0]) / (steps - 1)) if steps > 1 else total
    return total, per_step


def _measure(pipe, variant: str, steps: int, height: int, width: int, device: torch.device,
            warmup: int = 1, repeats: int = 3, tflop_per_step: float | None = None,
            peak_tflops: float | None = None, settings: dict | None = None, log=print) -> dict:
    """Time ``repeats`` images after ``warmup`` ones; the median of each figure is reported."""
    for _ in range(warmup):
        _one_image(pipe, steps, height, width, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [_one_image(pipe, steps, height, width, device) for _ in range(repeats)]
    s_per_image = statistics.median(r[0] for r in runs)
    it_per_s = 1.0 / statistics.median(r[1] for r in runs)
    share = (it_per_s * tflop_per_step / peak_tflops
             if tflop_per_step and peak_tflops else None)
    result = dict(
        variant=variant, device=_device_name(device), dtype=str(pipe.unet.dtype).split(".")[-1],
        height=height, width=width, steps=steps, it_per_s=it_per_s, s_per_image=s_per_image,
        peak_memory_gb=generation.peak_memory_bytes(device) / 1e9,
        memory_kind=("torch.cuda.max_memory_allocated" if device.type == "cuda"
                     else "process peak RSS (whole run so far)"),
        tflop_per_step=tflop_per_step, share_of_peak=share, settings=settings or {})
    log(f"{variant:>18}: {it_per_s:7.2f} it/s, {s_per_image:7.3f} s/image, "
        f"peak {result['peak_memory_gb']:.2f} GB" + (f", {share:.1%} of peak" if share else ""))
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _default_peak_tflops(device: torch.device) -> float | None:
    """The dense fp16/bf16 peak for known GPUs (by name), else None (pass --peak-tflops)."""
    if device.type != "cuda":
        return None
    return _peak_tflops_for(torch.cuda.get_device_name(device))


def _peak_tflops_for(name: str) -> float | None:
    """Look a GPU name up in PEAK_TFLOPS (every word of a key, as a whole word, in the name)."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if all(re.search(rf"(?<![\w]){re.escape(w)}(?![\w])", name) for w in key.split()):
            return PEAK_TFLOPS[key]
    return None


def _free():
    """Give memory back after the caller dropped its pipeline (``pipe = None``)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run(smoke: bool = False, device=None, dtype=None, steps: int | None = None,
        size: int | None = None, compile: bool | None = None, compile_mode: str = "max-autotune",
        memory_modes: bool | None = None, offload_steps: int = 10,
        peak_tflops: float | None = None, repeats: int | None = None, log=print) -> dict:
    """Run the benchmark; returns ``{"results": [...], "environment": {...}, ...}``.

    Without ``smoke`` it needs a CUDA GPU (SD 1.5 at 512x512 on a CPU takes minutes per image
    and says nothing about the goals). ``smoke`` runs the shrunken model at 64x64 for 2 steps
    on the CPU, without CUDA-only features (compilation is off unless asked for).
    """
    if smoke:
        choice = get_device(device or "cpu", dtype or "float32")
        steps = checks.check_steps(2 if steps is None else steps)
        size = 64 if size is None else size
        repeats = 1 if repeats is None else repeats
    else:
        choice = get_device(device, dtype)
        if choice.device.type != "cuda":
            checks.fail("device", str(choice.device), "the full benchmark needs a CUDA GPU; "
                                                      "run `python -m sdkit.bench --smoke` here")
        steps = checks.check_steps(50 if steps is None else steps)
        size = 512 if size is None else size
        repeats = 3 if repeats is None else repeats
    checks.check_int("repeats", repeats, 1, 100)
    checks.check_size(size, size, 64 if not smoke else 8)
    # refused before a model is built: SD 1.5 (or the smoke model) at this size must fit
    unet_cfg, vae_cfg = ((SMOKE_UNET, SMOKE_VAE) if smoke
                         else (generation.SD15_UNET, generation.SD15_VAE))
    nbytes = 4 if choice.dtype == torch.float32 else 2
    f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    check_memory("size", size, max(unet_memory_bytes(unet_cfg, 2, size // f, size // f, nbytes),
                                   vae_memory_bytes(vae_cfg, 1, size, size, nbytes)),
                 f"one guided step and one decode at {size}x{size}", device=choice.device)
    dev, fast_dtype = choice.device, choice.dtype
    if fast_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        checks.fail("dtype", fast_dtype, "float16, bfloat16 (or float32 on a CPU)")
    stock_dtype = torch.float16 if dev.type == "cuda" else torch.float32
    compile = (dev.type == "cuda") if compile is None else compile
    memory_modes = (dev.type == "cuda" and not smoke) if memory_modes is None else memory_modes
    if memory_modes and dev.type != "cuda":
        checks.fail("memory_modes", memory_modes, "CPU offload needs a CUDA GPU")
    peak = peak_tflops if peak_tflops is not None else _default_peak_tflops(dev)
    if peak is not None:
        checks.check_float("peak_tflops", peak, 1e-3, 1e5)
    pipe = build_pipeline(smoke, dev, stock_dtype)
    # the UNet's work per guided step, at the latent size this pipeline's VAE gives
    tflop = generation.unet_tflop_per_step(pipe.unet.config, size, size,
                                           vae_scale_factor(pipe.vae),
                                           seq_len=pipe.tokenizer.model_max_length)
    log(f"sdkit.bench: {'smoke test, ' if smoke else ''}{size}x{size}, {steps} steps, guidance "
        f"on, batch 1, on {_device_name(dev)}; UNet: {tflop:.4g} TFLOP per guided step; "
        f"peak: {peak if peak else 'unknown'} TFLOP/s")
    common = dict(steps=steps, height=size, width=size, device=dev, tflop_per_step=tflop,
                  peak_tflops=peak, log=log)
    results = [_measure(pipe, "stock", warmup=1, repeats=repeats,
                        settings={"attention": "diffusers default", "compile": False},
                        **common)]
    pipe = None
    _free()
    pipe = build_pipeline(smoke, dev, fast_dtype)
    settings = generation.apply_fast_settings(pipe, compile=compile, compile_mode=compile_mode)
    try:
        results.append(_measure(pipe, "fast", warmup=3 if compile else 1, repeats=repeats,
                                settings=settings, **common))
    except Exception as e:  # noqa: BLE001 - CUDA graph capture can fail; say so and go on
        if not compile or "no-cudagraphs" in compile_mode:
            raise
        log(f"fast with {compile_mode} failed ({type(e).__name__}: {str(e)[:200]}); "
            "retrying without CUDA graphs")
        pipe = None
        _free()
        torch._dynamo.reset()
        pipe = build_pipeline(smoke, dev, fast_dtype)
        settings = generation.apply_fast_settings(pipe, compile=True,
                                       compile_mode="max-autotune-no-cudagraphs")
        results.append(_measure(pipe, "fast", warmup=3, repeats=repeats, settings=settings,
                                **common))
    pipe = None
    _free()

    if memory_modes:
        for mode in ("model", "sequential"):
            pipe = build_pipeline(smoke, "cpu", stock_dtype, init_device=dev)
            getattr(pipe, f"enable_{mode}_cpu_offload")(device=dev)
            results.append(_measure(pipe, f"stock + {mode} offload", warmup=1, repeats=1,
                                    settings={"cpu_offload": mode},
                                    **{**common, "steps": offload_steps}))
            pipe = None
            _free()

    out = {"results": results, "environment": _environment(dev), "smoke": smoke,
           "published_it_s": PUBLISHED_IT_S, "goals": GOALS}
    by = {r["variant"]: r for r in results}
    out["speedup"] = by["fast"]["it_per_s"] / by["stock"]["it_per_s"]
    log(f"fast / stock: {out['speedup']:.2f}x in it/s")
    return out


def _environment(device: torch.device) -> dict:
    """Versions and hardware that the figures belong to."""
    import diffusers
    import transformers

    env = {"date": datetime.date.today().isoformat(), "device": _device_name(device),
           "torch": torch.__version__, "cuda": torch.version.cuda or "-",
           "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "driver": "-"}
    if device.type == "cuda":
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    return env


def _table_rows(out: dict) -> list[str]:
    """Markdown rows for docs/benchmarks.md's results table."""
    env = out["environment"]
    rows = []
    for r in out["results"]:
        share = f"{r['share_of_peak']:.1%}" if r["share_of_peak"] else "n/a"
        compiled = r["settings"].get("compile") or "-"
        rows.append(
            f"| {env['date']} | {env['device']}{' (smoke)' if out['smoke'] else ''} | "
            f"{env['driver']} | torch {env['torch']}, CUDA {env['cuda']}, diffusers "
            f"{env['diffusers']} | {r['variant']} | {r['dtype']} | {compiled} | "
            f"{r['height']}x{r['width']}, {r['steps']} steps | {r['it_per_s']:.2f} | "
            f"{r['s_per_image']:.3f} | {r['peak_memory_gb']:.2f} | {share} |")
    return rows


def _write_results(out: dict, path=DOCS) -> Path:
    """Add (or replace: same device, driver, versions and variant) rows in the results table
    between the markers in docs/benchmarks.md."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if RESULTS_START not in text or RESULTS_END not in text:
        checks.fail("path", str(path), f"expected the markers {RESULTS_START} and {RESULTS_END}")
    head, rest = text.split(RESULTS_START, 1)
    body, tail = rest.split(RESULTS_END, 1)
    lines = [ln for ln in body.strip("\n").splitlines()]
    new = _table_rows(out)

    def key(row):  # device, driver, versions, variant
        cells = [c.strip() for c in row.strip("|").split("|")]
        return tuple(cells[1:5]) if len(cells) > 5 else None

    keys = {key(r) for r in new}
    lines = [ln for ln in lines if not (ln.startswith("| 20") and key(ln) in keys)] + new
    path.write_text(head + RESULTS_START + "\n" + "\n".join(lines) + "\n" + RESULTS_END + tail,
                    encoding="utf-8")
    return path


def main(argv=None) -> int:
    """``python -m sdkit.bench``: parse the options (``argv``, default ``sys.argv[1:]``), run
    the benchmark, print it and, with ``--write``, record it in docs/benchmarks.md; returns 0.

    Introduced in notebooks/07_full_generation.ipynb.
    """
    p = argparse.ArgumentParser(prog="python -m sdkit.bench", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="shrunken model, 64x64, 2 steps, CPU: checks the benchmark runs")
    p.add_argument("--device", default=None, help="cuda, cuda:N (default: sdkit.get_device)")
    p.add_argument("--dtype", default=None,
                   help="the fast variant's dtype: float16 (default on CUDA) or bfloat16")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50)")
    p.add_argument("--size", type=int, default=None, help="image height and width (default 512)")
    p.add_argument("--repeats", type=int, default=None, help="timed images per variant")
    p.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction,
                   default=None, help="torch.compile the fast variant (default: on CUDA)")
    p.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile mode (max-autotune uses CUDA graphs)")
    p.add_argument("--memory-modes", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure model/sequential CPU offload (default: on CUDA)")
    p.add_argument("--offload-steps", type=int, default=10,
                   help="steps for the offload runs (sequential offload is slow)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense fp16/bf16 peak in TFLOP/s (e.g. 989 for an H100 SXM)")
    p.add_argument("--write", action="store_true",
                   help=f"record the figures in {DOCS.relative_to(DOCS.parent.parent)}")
    p.add_argument("--json", default=None,
                   help="write all figures as JSON to this file ('-': stdout)")
    a = p.parse_args(argv)
    out = _run(smoke=a.smoke, device=a.device, dtype=a.dtype, steps=a.steps, size=a.size,
               compile=a.compile, compile_mode=a.compile_mode, memory_modes=a.memory_modes,
               offload_steps=a.offload_steps, peak_tflops=a.peak_tflops, repeats=a.repeats,
               log=(lambda *x: print(*x, file=sys.stderr)) if a.json == "-" else print)
    if a.json == "-":
        print(json.dumps(out, indent=1, default=str))
    elif a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    if a.write:
        print("wrote", _write_results(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
