"""The notebooks' half of the second bad-input table (issue 12): attention, fine-tuning,
variations, training, widgets and evaluation, by kind (tests/mistakes.py says what a row is;
tests/test_classroom_mistakes.py runs them and checks the tiny pipeline's state after each).

Memory rows set ``SDKIT_MEMORY_LIMIT`` so that the refusal does not depend on the machine
running the tests; they are refused before anything is allocated or trained. Training rows
use two tiny latents and at most five steps. The helpers here build what a row needs (a saved
LoRA, hypernetwork or learned word; a broken file) in the row's tmp folder.
"""

from __future__ import annotations

import contextlib
import copy
import os
from unittest import mock

import numpy as np
import torch
from mistakes import PROMPT, Behaves, Mistake, Refused, good_call
from safetensors.torch import save_file

from sdkit import (
    attention,
    clip,
    evaluation,
    finetune,
    guidance,
    hypernetwork,
    lora,
    samplers,
    sampling,
    textual_inversion,
    training,
    unclip,
    unet,
    unet_views,
    variations,
    widgets,
)

CAPTIONS = [PROMPT, "a blue square on the right"]
STAR = ["a red <star> on the left", "a blue <star> on the right"]
LIMIT = "SDKIT_MEMORY_LIMIT"  # the memory rows' messages must say how to raise the limit


def _latents(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # (n, 4, 16, 16)


def _nan_latents() -> torch.Tensor:
    lat = _latents()
    lat[1, 0, 3, 3] = float("nan")  # one bad pixel: a picture that failed to encode
    return lat


def _lora(c, **kw):
    args = dict(steps=1, batch_size=2) | kw
    return lora.train_lora(c.pipe, _latents(), CAPTIONS, **args)


def _hyper(c, **kw):
    args = dict(steps=1, batch_size=2) | kw
    return hypernetwork.train_hypernetwork(c.pipe, _latents(), CAPTIONS, **args)


def _ti(c, **kw):
    args = dict(steps=1, batch_size=2) | kw
    return textual_inversion.train_textual_inversion(c.pipe, _latents(), STAR, **args)


def _raises(exc, call):
    """Run ``call``; return the exception of type ``exc`` it raised (the row then checks it)."""
    try:
        call()
    except exc as e:
        return e
    raise AssertionError(f"expected {exc.__name__}")


def _interrupt_at(target, name: str, step: int):
    """Patch ``target.name`` to raise KeyboardInterrupt (Jupyter's stop button) on its call
    number ``step`` (1-based); the calls before run as usual."""
    real, calls = getattr(target, name), [0]

    def stop(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return mock.patch.object(target, name, stop)


def _nan_loss(target=finetune, name="diffusion_loss"):
    """Patch the loss to come out NaN from the second step on: a run that diverges."""
    real, calls = getattr(target, name), [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls[0] >= 2 else out

    return mock.patch.object(target, name, loss)


# ------------------------------------------------------------------------------ saved files


def _lora_file(c, name="lora.safetensors", r=2) -> str:
    unet = copy.deepcopy(c.pipe.unet)
    unet.add_adapter(lora._lora_config(r))
    result = finetune.FineTuneResult("DreamBooth LoRA", None, [], 0, [], 0.0, extra={
        "unet": unet, "r": r, "alpha": float(r), "target_modules": list(lora.LORA_TARGETS)})
    return str(lora.save_lora(result, c.tmp / name))


def _hyper_file(c, name="hyper.safetensors", names=None, hidden=4) -> str:
    hyper = hypernetwork._make_hypernetwork(c.pipe.unet, hidden)
    if names is not None:  # a hypernetwork of another model's layers
        hyper = hypernetwork._Hypernetwork(names, c.pipe.unet.config.cross_attention_dim, hidden)
    result = finetune.FineTuneResult("hypernetwork", None, [], 0, [], 0.0,
                                     extra={"hypernetwork": hyper, "hidden": hidden})
    return str(hypernetwork.save_hypernetwork(result, c.tmp / name))


def _embedding_file(c, token="<star>", row=None, name="star.safetensors") -> str:
    row = torch.randn(32) if row is None else row  # the tiny text encoder's width is 32
    save_file({token: row}, str(c.tmp / name))
    return str(c.tmp / name)


def _truncated(path: str) -> str:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return path


def _write(c, name: str, data: bytes) -> str:
    (c.tmp / name).write_bytes(data)
    return str(c.tmp / name)


# ------------------------------------------------------------------------------ attention


def _attn2_hooks(unet) -> int:
    """Forward hooks left on the cross-attention layers and their projections."""
    return sum(len(m._forward_hooks) for n, m in unet.named_modules()
               if ".attn2" in n and (n.endswith("attn2") or n.endswith(("to_q", "to_k"))))


def _attn2_layers(unet) -> int:
    return sum(n.endswith("attn2") for n, _ in unet.named_modules())


def _records_of_one_run(pipe) -> int:
    with attention.AttentionStore(pipe.unet) as store:
        good_call(pipe)
    return len(store.records)


def _store_nested(c):
    store = attention.AttentionStore(c.pipe.unet)
    with store, store:  # the same store entered twice (a cell re-run inside another)
        good_call(c.pipe)
        inside = _attn2_hooks(c.pipe.unet)
    return store, inside, _attn2_hooks(c.pipe.unet)


def _check_store_nested(result, c):
    store, inside, after = result
    assert inside == 3 * _attn2_layers(c.pipe.unet), inside  # 3 hooks a layer, once
    assert after == 0
    assert len(store.records) == _records_of_one_run(c.pipe)  # recorded once, not twice


def _store_after_failure(c):
    store = attention.AttentionStore(c.pipe.unet)
    with contextlib.suppress(RuntimeError), store:
        raise RuntimeError("a cell that failed inside the block")
    hooks_after_failure = _attn2_hooks(c.pipe.unet)
    with store:
        good_call(c.pipe)
    return store, hooks_after_failure


def _check_store_after_failure(result, c):
    store, hooks = result
    assert hooks == 0 and _attn2_hooks(c.pipe.unet) == 0
    assert len(store.records) == _records_of_one_run(c.pipe)


def _store_interrupted(c):
    store = attention.AttentionStore(c.pipe.unet)
    with _interrupt_at(c.pipe.unet, "forward", 2), contextlib.suppress(KeyboardInterrupt), store:
        good_call(c.pipe)
    return store


def _check_store_interrupted(store, c):
    assert _attn2_hooks(c.pipe.unet) == 0
    assert 0 < len(store.records) < _records_of_one_run(c.pipe)  # the first UNet call only


def _two_stores(c):
    with attention.AttentionStore(c.pipe.unet) as outer:
        with attention.AttentionStore(c.pipe.unet) as inner:
            good_call(c.pipe)
        hooks_between = _attn2_hooks(c.pipe.unet)
    return outer, inner, hooks_between


def _check_two_stores(result, c):
    outer, inner, between = result
    assert between == 3 * _attn2_layers(c.pipe.unet)  # inner's exit left outer's hooks on
    assert _attn2_hooks(c.pipe.unet) == 0
    for (n1, s1, p1), (n2, s2, p2) in zip(outer.records, inner.records, strict=True):
        assert (n1, s1) == (n2, s2) and torch.equal(p1, p2)


def _randomised(module, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def _hyper_pipe(c):
    """A copy of the tiny pipe with a (random, so visible) hypernetwork installed."""
    unet = copy.deepcopy(c.pipe.unet)
    hypernetwork._install_hypernetwork(unet, _randomised(hypernetwork._make_hypernetwork(unet, 8)))
    return finetune._rebuild(c.pipe, unet=unet)


def _lora_pipe(c):
    unet = copy.deepcopy(c.pipe.unet)
    unet.add_adapter(lora._lora_config(2))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:  # B starts at zero (the model itself): make the LoRA visible
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    return finetune._rebuild(c.pipe, unet=unet)


def _through(make):
    def call(c):
        adapted = make(c)
        outside = good_call(adapted)
        with attention.AttentionStore(adapted.unet) as store:
            inside = good_call(adapted)
        return outside, inside, store, adapted

    return call


def _check_through(result, c):
    outside, inside, store, adapted = result
    np.testing.assert_array_equal(inside, outside)  # the store changes nothing
    assert not np.array_equal(inside, good_call(c.pipe))  # and the adapter really acts
    assert store.records and _attn2_hooks(adapted.unet) == 0
    assert store.word_maps().shape[0] == adapted.tokenizer.model_max_length


def _check_hyper_maps(result, c):
    """The maps are the hypernetwork's, not the base model's: they differ from the base's."""
    _check_through(result, c)
    with attention.AttentionStore(c.pipe.unet) as base:
        good_call(c.pipe)
    assert not torch.allclose(result[2].word_maps(), base.word_maps())


def _capture_io_error(c):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    layer = dict(c.pipe.unet.named_modules())[name]
    with contextlib.suppress(RuntimeError), attention.capture_io(layer) as calls:
        good_call(c.pipe)
        raise RuntimeError("a failing cell")
    return layer, calls


def _check_capture_io_error(result, c):
    layer, calls = result
    assert calls and not layer._forward_hooks


# ------------------------------------------------------------------------------ fine-tuning


def _interrupted(trainer, **kw):
    def call(c):
        with _interrupt_at(finetune, "diffusion_loss", 2):
            return _raises(KeyboardInterrupt, lambda: trainer(c, steps=5, **kw))

    return call


def _check_interrupted(e, c):
    assert "stopped after 1 of 5 steps" in str(e), e
    assert all(p.requires_grad for p in c.pipe.unet.parameters())  # as the tiny pipe had them


def _diverging(trainer):
    def call(c):
        with _nan_loss():
            return _raises(ValueError, lambda: trainer(c, steps=5, lr=1e-2))

    return call


def _check_diverged(e, c):
    assert "lr=0.01 is not allowed" in str(e) and "step 2 of 5 became nan" in str(e), e


def _embedding_twice(c):
    once = textual_inversion.load_embedding(c.pipe, _embedding_file(c))
    size = len(once.tokenizer)
    e = _raises(ValueError, lambda: textual_inversion.load_embedding(once, _embedding_file(c)))
    return once, size, e


def _check_embedding_twice(result, c):
    once, size, e = result
    assert "does not know yet" in str(e) and len(once.tokenizer) == size
    assert len(c.pipe.tokenizer) == size - 1  # only the copy learnt the word


def _home_embedding(c):
    _embedding_file(c)
    with mock.patch.dict(os.environ, {"HOME": str(c.tmp)}):
        return textual_inversion.load_embedding(c.pipe, "~/star.safetensors")


def _check_knows_star(pipe, c):
    assert "<star>" in pipe.tokenizer.get_vocab() and "<star>" not in c.pipe.tokenizer.get_vocab()


# ------------------------------------------------------------------------------ variations


def _nan_text_pipe(c):
    text_encoder = copy.deepcopy(c.pipe.text_encoder)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.fill_(float("nan"))
    return finetune._rebuild(c.pipe, text_encoder=text_encoder)


def _fit_tiny(pipe, **kw):
    args = dict(n_images=16, projector_steps=2, batch=4, progress=False) | kw
    return variations.fit(pipe, seed=123, **args)


def _fit_interrupted(c):
    rng = torch.random.get_rng_state()
    with _interrupt_at(variations, "noise_augment", 2):
        _raises(KeyboardInterrupt, lambda: _fit_tiny(c.pipe))
    return rng


def _check_fit_interrupted(rng, c):
    assert torch.equal(torch.random.get_rng_state(), rng)  # fork_rng put it back
    assert not any(k[1] == 123 for k in variations._CACHE)  # nothing half-trained was cached


def _unclip_folder(c, parts: dict, missing: tuple = ()) -> str:
    """A folder whose model_index.json names a Stable unCLIP pipeline with ``parts``
    ({component: {file name: bytes}}) and also lists the ``missing`` components."""
    import json

    classes = {"image_encoder": "CLIPVisionModelWithProjection", "unet": "UNet2DConditionModel"}
    index = {"_class_name": "StableUnCLIPImg2ImgPipeline"} | {
        part: ["diffusers", classes[part]] for part in [*parts, *missing]}
    (c.tmp / "unclip").mkdir()
    (c.tmp / "unclip" / "model_index.json").write_text(json.dumps(index))
    for part, files in parts.items():
        (c.tmp / "unclip" / part).mkdir()
        for name, data in files.items():
            (c.tmp / "unclip" / part / name).write_bytes(data)
    return str(c.tmp / "unclip")


# ------------------------------------------------------------------------------ widgets


def _panel_set(widget: str, value):
    def call(c):
        panel = widgets.GuidancePanel(c.pipe, num_inference_steps=2, strip="preview")
        shown, before = panel.image_bytes(), getattr(panel, widget).value
        getattr(panel, widget).value = value
        return panel, shown, before

    return call


def _check_refused_in_panel(name: str, value: str):
    def check(result, c):
        panel, shown, before = result
        widget = {"num_inference_steps": panel.steps_slider, "guidance_scale":
                  panel.guidance_slider, "seed": panel.seed_box}[name]
        assert widget.value == before  # not clamped to the range's end
        assert panel.status_mode == "error"
        assert f"{name}={value} is not allowed: expected a value in [" in panel.error_text
        assert panel.image_bytes() == shown  # the last good image stays

    return check


def _panel_recovers(c):
    panel, _, _ = _panel_set("steps_slider", 1000)(c)
    panel.steps_slider.value = 3
    return panel


def _check_panel_recovers(panel, c):
    assert panel.status_mode == "exact" and panel.error_text == ""
    assert panel.trajectory.num_inference_steps == 3


# ------------------------------------------------------------------------------ evaluation


def _model_folder(c):
    """The tiny pipe saved as a diffusers folder (for evaluate's refusals)."""
    c.pipe.save_pretrained(c.tmp / "model")
    return c.tmp / "model"


def _empty_model_folder(c):
    (c.tmp / "model").mkdir()
    (c.tmp / "model" / "model_index.json").write_text("{}")
    return c.tmp / "model"


# ------------------------------------------------------------------------------ the UNet (03)


def _entered(cm):
    """Enter and leave a context manager: its checks run on entering."""
    with cm:
        pass


def _generated_inside(c, cm):
    """One good call of the tiny pipe inside the context manager ``cm``."""
    with cm:
        good_call(c.pipe)


def _hooks(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _ablations_stopped(c):
    """The stop button during a generation under three of notebook 03's ablations at once."""
    u, before = c.pipe.unet, _hooks(c.pipe.unet)

    def stopped():
        with unet.zero_time_embedding(u), unet.drop_skip(u, 1), unet.zero_cross_attention(u, 8):
            good_call(c.pipe)
            raise KeyboardInterrupt
    return _raises(KeyboardInterrupt, stopped), before


def _record_calls_failed(c):
    """A cell that fails inside ``record_calls``."""
    u, before = c.pipe.unet, _hooks(c.pipe.unet)

    def failed():
        with unet.record_calls(u.down_blocks[0].resnets[0]):
            good_call(c.pipe)
            raise RuntimeError("a failed cell")
    return _raises(RuntimeError, failed), before


def _check_unhooked(result, c):
    error, before = result
    assert isinstance(error, (KeyboardInterrupt, RuntimeError))
    assert _hooks(c.pipe.unet) == before, "a hook was left on the UNet"


def _refused(param, value, allowed, exc=ValueError):
    return Refused(param, value, allowed, exc)


def _memory(param, value):
    return Refused(param, value, LIMIT)


M = Mistake
MISTAKES = [
    # ---------------------------------------------------------------- memory: refused up front
    M("memory", "train-lora-batch-4096", lambda c: _lora(c, batch_size=4096), _memory(
        "batch_size", "4096"), needs_pipe=True, env={LIMIT: "8GiB"}),
    M("memory", "train-lora-batch-4096-with-prior", lambda c: lora.train_lora(
        c.pipe, _latents(), CAPTIONS, _latents(), CAPTIONS, steps=1, batch_size=2048),
      _memory("batch_size", "2048"), needs_pipe=True, env={LIMIT: "8GiB"}),
    M("memory", "train-lora-rank-1024", lambda c: _lora(c, r=1024),
      _refused("r", "1024", "the full rank of the narrowest adapted layer"), needs_pipe=True),
    M("memory", "textual-inversion-batch-4096", lambda c: _ti(c, batch_size=4096),
      _memory("batch_size", "4096"), needs_pipe=True, env={LIMIT: "8GiB"}),
    M("memory", "hypernetwork-batch-4096", lambda c: _hyper(c, batch_size=4096),
      _memory("batch_size", "4096"), needs_pipe=True, env={LIMIT: "8GiB"}),
    M("memory", "hypernetwork-hidden-65536", lambda c: _hyper(c, hidden=65536),
      _memory("hidden", "65536"), needs_pipe=True, env={LIMIT: "256MiB"}),
    M("memory", "variations-fit-a-million-images", lambda c: variations.fit(
        c.pipe, n_images=1_000_000), _memory("n_images", "1000000"), needs_pipe=True,
      env={LIMIT: "8GiB"}),
    M("memory", "variations-fit-batch-as-big-as-the-data", lambda c: variations.fit(
        c.pipe, n_images=50_000, batch=50_000), _memory("n_images", "50000"), needs_pipe=True,
      env={LIMIT: "2GiB"}),
    M("memory", "training-data-200k-pictures", lambda c: training.training_data(200_000),
      _memory("n", "200000"), env={LIMIT: "1GiB"}),
    M("memory", "encode-latents-batch-4096-of-big-pictures", lambda c: training.encode_latents(
        c.pipe.vae, np.zeros((1, 512, 512, 3), np.uint8), batch=4096),
      _memory("batch", "4096"), needs_pipe=True, env={LIMIT: "4GiB"}),
    M("memory", "heldout-psnr-4096-pictures", lambda c: training.heldout_psnr(c.pipe.vae, 4096),
      _memory("n", "4096"), needs_pipe=True, env={LIMIT: "512MiB"}),
    M("memory", "panel-cache-10000-runs", lambda c: widgets.GuidancePanel(
        c.pipe, cache_size=10_000), _memory("cache_size", "10000"), needs_pipe=True,
      env={LIMIT: "1GiB"}),
    M("memory", "guided-run-64-seeds", lambda c: guidance.sample_rescaled(
        c.pipe, PROMPT, list(range(64)), 7.5, 0.7, 2), _memory("seeds", "64 seeds"),
      needs_pipe=True, env={LIMIT: "16MiB"}),
    M("memory", "trace-shapes-latent-1024", lambda c: unet.trace_shapes(
        c.pipe.unet, sample_size=1024), _memory("sample_size", "1024"), needs_pipe=True,
      env={LIMIT: "256MiB"}),
    M("memory", "evaluate-10000-prompts", lambda c: evaluation.evaluate(
        _model_folder(c), n_prompts=10_000, write_card=False), _memory("n_prompts", "10000"),
      needs_pipe=True, env={LIMIT: "64MiB"}),
    # ---------------------------------------------------------------- silent: refused or said
    M("silent", "train-lora-lr-10-diverges", lambda c: _lora(c, lr=10.0, steps=30),
      _refused("lr", "10.0", "expected a smaller learning rate"), needs_pipe=True),
    M("silent", "hypernetwork-loss-diverges", _diverging(_hyper), Behaves(_check_diverged),
      needs_pipe=True),
    M("silent", "textual-inversion-loss-diverges", _diverging(_ti), Behaves(_check_diverged),
      needs_pipe=True),
    M("silent", "train-lora-nan-latents", lambda c: lora.train_lora(
        c.pipe, _nan_latents(), CAPTIONS, steps=1), _refused("latents", "NaN", "finite latents"),
      needs_pipe=True),
    M("silent", "hypernetwork-nan-latents", lambda c: hypernetwork.train_hypernetwork(
        c.pipe, _nan_latents(), CAPTIONS, steps=1), _refused("latents", "NaN", "finite latents"),
      needs_pipe=True),
    M("silent", "textual-inversion-nan-latents", lambda c: (
        textual_inversion.train_textual_inversion(c.pipe, _nan_latents(), STAR, steps=1)),
      _refused("latents", "NaN", "finite latents"), needs_pipe=True),
    M("silent", "train-lora-rank-above-layer-width", lambda c: _lora(c, r=17),
      _refused("r", "17", "expected a rank <= 16"), needs_pipe=True),
    M("silent", "train-lora-target-no-such-layer", lambda c: _lora(c, target_modules=["to_qq"]),
      _refused("target_modules", "to_qq", "no layer matches ['to_qq']"), needs_pipe=True),
    M("silent", "train-lora-target-one-string", lambda c: _lora(c, target_modules="to_q"),
      _refused("target_modules", "'to_q'", "expected a list of layer names"), needs_pipe=True),
    M("silent", "diffusion-loss-reduction-sum", lambda c: finetune.diffusion_loss(
        None, None, None, None, None, None, reduction="sum"),
      _refused("reduction", "'sum'", "expected one of ['mean', 'none']")),
    M("silent", "plot-file-sizes-in-megabytes", lambda c: finetune.plot_file_sizes(
        {"LoRA": 11.0}), _refused("sizes", "11.0", "a non-empty dict {label: bytes}")),
    M("silent", "variations-fit-nan-text-encoder", lambda c: _fit_tiny(_nan_text_pipe(c)),
      _refused("pipe", "text features", "expected finite text features"), needs_pipe=True),
    M("silent", "variations-fit-progress-yes", lambda c: _fit_tiny(c.pipe, progress="yes"),
      _refused("progress", "'yes'", "expected True or False"), needs_pipe=True),
    M("silent", "variations-model-of-another-pipe", lambda c: variations.variations(
        c.pipe, variations.ToyUnCLIP(clip.load_clip(), None, 7, 9),
        np.zeros((64, 64, 3), np.uint8), [0]),
      _refused("model", "(7, 9)", "expected one fit on this pipe"), needs_pipe=True),
    M("silent", "unclip-load-safety-checker-yes", lambda c: unclip.load_pipeline(
        "toy", safety_checker="yes"), _refused("safety_checker", "'yes'",
                                               "expected True or False")),
    M("silent", "unclip-load-model-a-number", lambda c: unclip.load_pipeline(42),
      _refused("model", "42", "expected 'toy', a hub id, a folder")),
    M("silent", "evaluate-attention-prompts-0", lambda c: evaluation.evaluate(
        _empty_model_folder(c), attention_prompts=0), _refused("attention_prompts", "0",
                                                               "expected an int in [1, 10000]")),
    M("silent", "evaluate-sweep-prompts-0", lambda c: evaluation.evaluate(
        _empty_model_folder(c), sweep_prompts=0), _refused("sweep_prompts", "0",
                                                           "expected an int in [1, 10000]")),
    M("silent", "run-samplers-heun-left-out", lambda c: samplers.run_samplers(
        c.pipe, [PROMPT], [0], (2,), ("DDIM", "Heun")),
      _refused("names", "'Heun'", "one of ['DDPM', 'DDIM', 'Euler', 'DPM-Solver++']"),
      needs_pipe=True),
    M("silent", "run-samplers-steps-0", lambda c: samplers.run_samplers(
        c.pipe, [PROMPT], [0], (0, 2)), _refused("steps_list", "0", "[1, 1000]"),
      needs_pipe=True),
    M("silent", "plot-sigmas-no-final-sigma", lambda c: samplers.plot_sigmas(
        torch.ones(10), torch.tensor([9.0, 5.0]), torch.tensor([3.0, 1.0])),
      _refused("sampler_sigmas", "(2,)", "1-d tensor of 3 values")),
    M("silent", "plot-errors-empty", lambda c: samplers.plot_errors({}),
      _refused("errors", "'dict'", "at least one of each")),
    M("silent", "plot-x0-paths-item-out-of-batch", lambda c: samplers.plot_x0_paths(
        sampling.sample(c.pipe, PROMPT, 0, 2, 3.0), item=1),
      _refused("item", "1", "[0, 0]"), needs_pipe=True),
    M("silent", "panel-steps-1000-over-the-slider", _panel_set("steps_slider", 1000),
      Behaves(_check_refused_in_panel("num_inference_steps", "1000")), needs_pipe=True),
    M("silent", "panel-guidance-100-over-the-slider", _panel_set("guidance_slider", 100.0),
      Behaves(_check_refused_in_panel("guidance_scale", "100.0")), needs_pipe=True),
    M("silent", "panel-seed-negative", _panel_set("seed_box", -1),
      Behaves(_check_refused_in_panel("seed", "-1")), needs_pipe=True),
    M("silent", "panel-good-value-after-a-refused-one", _panel_recovers,
      Behaves(_check_panel_recovers), needs_pipe=True),
    M("silent", "panel-steps-over-max-at-construction", lambda c: widgets.GuidancePanel(
        c.pipe, num_inference_steps=80), _refused("num_inference_steps", "80",
                                                  "expected an int in [1, 50]"), needs_pipe=True),
    M("silent", "guided-run-rescale-above-1", lambda c: guidance.sample_rescaled(
        c.pipe, PROMPT, [0], 7.5, 1.5, 2), _refused("guidance_rescale", "1.5",
                                                   "expected a finite number in [0.0, 1.0]"),
      needs_pipe=True),
    M("silent", "guided-run-more-prompts-than-seeds", lambda c: guidance.sample_rescaled(
        c.pipe, [PROMPT] * 3, [0, 1], 7.5), _refused("prompts", PROMPT,
                                                     "expected one str or a list of 2 str"),
      needs_pipe=True),
    M("silent", "sweep-one-setting-twice", lambda c: guidance.sweep(
        c.pipe, PROMPT, [0], [7.5, (7.5, 0)], 2), _refused("settings", "[7.5, (7.5, 0)]",
                                                         "expected each (s, phi) once"),
      needs_pipe=True),
    M("silent", "sweep-setting-of-three-numbers", lambda c: guidance.sweep(
        c.pipe, PROMPT, [0], [(7.5, 0.7, 1)], 2), _refused(
        "settings", "(7.5, 0.7, 1)", "expected (guidance_scale, guidance_rescale) pairs"),
      needs_pipe=True),
    M("silent", "diversity-no-prompt-with-two-pictures", lambda c: guidance.diversity(
        [np.zeros((8, 8, 3), np.uint8)] * 2, ["a", "b"]), _refused(
        "prompts", "['a', 'b']", "expected at least one prompt with two pictures")),
    M("silent", "trace-shapes-of-the-pipeline", lambda c: unet.trace_shapes(c.pipe),
      _refused("unet", "StableDiffusionPipeline", "expected a diffusers UNet2DConditionModel"),
      needs_pipe=True),
    M("silent", "drop-skip-past-the-last", lambda c: _entered(unet.drop_skip(c.pipe.unet, 4)),
      _refused("index", "4", "expected an int in [0, 3]"), needs_pipe=True),
    M("silent", "frozen-timestep-negative", lambda c: unet.frozen_timestep(c.pipe.unet, -1),
      _refused("timestep", "-1", "expected an int in [0, 10000]"), needs_pipe=True),
    M("silent", "zero-cross-attention-side-no-layer-has", lambda c: _generated_inside(
        c, unet.zero_cross_attention(c.pipe.unet, 5)),
      _refused("side", "5", "the sides seen were [16, 8]"), needs_pipe=True),
    M("silent", "record-calls-of-a-name", lambda c: _entered(unet.record_calls("conv_in")),
      _refused("module", "'conv_in'", "expected a torch.nn.Module")),
    M("silent", "draw-trace-of-the-unet", lambda c: unet_views.draw_trace(c.pipe.unet),
      _refused("records", "UNet2DConditionModel", "expected a list"), needs_pipe=True),
    M("silent", "plot-ablations-percent-not-share", lambda c: unet_views.plot_ablations(
        {"intact": {"prompts fully right": 87.5}}),
      _refused("scores['intact']['prompts fully right']", "87.5", "in [0.0, 1.0]")),
    # ---------------------------------------------------------------- state: nothing left behind
    M("state", "unet-ablations-stop-button", _ablations_stopped, Behaves(_check_unhooked),
      needs_pipe=True),
    M("state", "record-calls-failed-cell", _record_calls_failed, Behaves(_check_unhooked),
      needs_pipe=True),
    M("state", "attention-store-entered-twice", _store_nested, Behaves(_check_store_nested),
      needs_pipe=True),
    M("state", "attention-store-after-a-failed-cell", _store_after_failure,
      Behaves(_check_store_after_failure), needs_pipe=True),
    M("state", "attention-store-stop-button", _store_interrupted,
      Behaves(_check_store_interrupted), needs_pipe=True),
    M("state", "attention-two-stores-nested", _two_stores, Behaves(_check_two_stores),
      needs_pipe=True),
    M("state", "attention-store-through-a-hypernetwork", _through(_hyper_pipe),
      Behaves(_check_hyper_maps), needs_pipe=True),
    M("state", "attention-store-through-a-lora", _through(_lora_pipe), Behaves(_check_through),
      needs_pipe=True),
    M("state", "capture-io-failed-cell", _capture_io_error, Behaves(_check_capture_io_error),
      needs_pipe=True),
    M("state", "train-lora-stop-button", _interrupted(_lora), Behaves(_check_interrupted),
      needs_pipe=True),
    M("state", "hypernetwork-stop-button", _interrupted(_hyper), Behaves(_check_interrupted),
      needs_pipe=True),
    M("state", "textual-inversion-stop-button", _interrupted(_ti), Behaves(_check_interrupted),
      needs_pipe=True),
    M("state", "variations-fit-stop-button", _fit_interrupted, Behaves(_check_fit_interrupted),
      needs_pipe=True),
    M("state", "load-embedding-twice", _embedding_twice, Behaves(_check_embedding_twice),
      needs_pipe=True),
    M("state", "load-embedding-wrong-width-changes-nothing", lambda c: (
        textual_inversion.load_embedding(c.pipe, _embedding_file(c, row=torch.randn(768)))),
      _refused("path", "star.safetensors", "this text encoder's width"), needs_pipe=True),
    M("state", "textual-inversion-known-token", lambda c: _ti(c, token="<|endoftext|>"),
      _refused("token", "'<|endoftext|>'", "expected a new word in angle brackets"),
      needs_pipe=True),
    # ---------------------------------------------------------------- loading: what is wrong
    M("loading", "load-lora-truncated-file", lambda c: lora.load_lora(
        c.pipe, _truncated(_lora_file(c))), _refused("path", "lora.safetensors",
                                                     "not a readable safetensors file"),
      needs_pipe=True),
    M("loading", "load-lora-garbage-file", lambda c: lora.load_lora(
        c.pipe, _write(c, "x.safetensors", b"not a model at all" * 10)),
      _refused("path", "x.safetensors", "not a readable safetensors file"), needs_pipe=True),
    M("loading", "load-lora-empty-file", lambda c: lora.load_lora(
        c.pipe, _write(c, "e.safetensors", b"")),
      _refused("path", "e.safetensors", "not a readable safetensors file"), needs_pipe=True),
    M("loading", "load-lora-folder-holding-the-file", lambda c: lora.load_lora(
        c.pipe, os.path.dirname(_lora_file(c, "runs/lora.safetensors"))),
      _refused("path", "runs", "e.g. one of ['lora.safetensors']"), needs_pipe=True),
    M("loading", "load-lora-empty-folder", lambda c: (c.tmp / "out").mkdir() or lora.load_lora(
        c.pipe, c.tmp / "out"), _refused("path", "out", "(it holds none)"), needs_pipe=True),
    M("loading", "load-lora-missing-file", lambda c: lora.load_lora(c.pipe, "nope.safetensors"),
      _refused("path", "nope.safetensors", "expected an existing .safetensors file"),
      needs_pipe=True),
    M("loading", "load-lora-pickle", lambda c: lora.load_lora(
        c.pipe, _write(c, "lora.pt", b"\x80\x04")), _refused("path", "lora.pt",
                                                             "pickle files are never loaded"),
      needs_pipe=True),
    M("loading", "load-lora-of-a-hypernetwork-file", lambda c: lora.load_lora(
        c.pipe, _hyper_file(c)), _refused("path", "hyper.safetensors", "written by save_lora"),
      needs_pipe=True),
    M("loading", "load-lora-of-an-embedding-file", lambda c: lora.load_lora(
        c.pipe, _embedding_file(c)), _refused("path", "star.safetensors", "written by save_lora"),
      needs_pipe=True),
    M("loading", "load-lora-bad-rank-in-metadata", lambda c: lora.load_lora(c.pipe, (
        save_file({"x": torch.zeros(2)}, str(c.tmp / "r.safetensors"),
                  metadata={"r": "four", "lora_alpha": "4", "target_modules": "[]"})
        or c.tmp / "r.safetensors")), _refused("path", "r.safetensors", "r, lora_alpha"),
      needs_pipe=True),
    M("loading", "load-lora-of-another-unet", lambda c: lora.load_lora(c.pipe, (
        save_file({k: torch.zeros(3, 3) for k in _lora_keys(c)}, str(c.tmp / "o.safetensors"),
                  metadata={"r": "2", "lora_alpha": "2.0", "target_modules": '["to_q"]'})
        or c.tmp / "o.safetensors")), _refused("path", "o.safetensors", "another UNet"),
      needs_pipe=True),
    M("loading", "load-lora-with-layers-missing", lambda c: lora.load_lora(c.pipe, (
        save_file({k: v for k, v in list(_lora_state(c).items())[:2]},
                  str(c.tmp / "m.safetensors"), metadata={"r": "2", "lora_alpha": "2.0",
                                                           "target_modules": '["to_q"]'})
        or c.tmp / "m.safetensors")), _refused("path", "m.safetensors", "layers without weights"),
      needs_pipe=True),
    M("loading", "load-hypernetwork-truncated", lambda c: hypernetwork.load_hypernetwork(
        c.pipe, _truncated(_hyper_file(c))), _refused("path", "hyper.safetensors",
                                                      "not a readable safetensors file"),
      needs_pipe=True),
    M("loading", "load-hypernetwork-of-a-lora-file", lambda c: hypernetwork.load_hypernetwork(
        c.pipe, _lora_file(c)), _refused("path", "lora.safetensors", "save_hypernetwork"),
      needs_pipe=True),
    M("loading", "load-hypernetwork-of-another-unet", lambda c: hypernetwork.load_hypernetwork(
        c.pipe, _hyper_file(c, names=["mid_block.attentions.0.attn2.processor"])),
      _refused("path", "hyper.safetensors", "made for another UNet"), needs_pipe=True),
    M("loading", "load-hypernetwork-hidden-lies", lambda c: hypernetwork.load_hypernetwork(
        c.pipe, _relabelled(_hyper_file(c), hidden="8")),
      _refused("path", "hyper.safetensors", "of another shape"), needs_pipe=True),
    M("loading", "load-hypernetwork-folder", lambda c: hypernetwork.load_hypernetwork(
        c.pipe, os.path.dirname(_hyper_file(c, "hn/style.safetensors"))),
      _refused("path", "hn", "e.g. one of ['style.safetensors']"), needs_pipe=True),
    M("loading", "load-embedding-truncated", lambda c: textual_inversion.load_embedding(
        c.pipe, _truncated(_embedding_file(c))), _refused("path", "star.safetensors",
                                                          "not a readable safetensors file"),
      needs_pipe=True),
    M("loading", "load-embedding-of-a-lora-file", lambda c: textual_inversion.load_embedding(
        c.pipe, _lora_file(c)), _refused("path", "lora.safetensors", "expected one token"),
      needs_pipe=True),
    M("loading", "load-embedding-nan-vector", lambda c: textual_inversion.load_embedding(
        c.pipe, _embedding_file(c, row=torch.full((32,), float("nan")))),
      _refused("path", "star.safetensors", "one finite vector of 32 numbers"), needs_pipe=True),
    M("loading", "load-embedding-a1111-shape", lambda c: textual_inversion.load_embedding(
        c.pipe, _embedding_file(c, row=torch.randn(1, 32))),
      _refused("path", "star.safetensors", "found torch.float32 (1, 32)"), needs_pipe=True),
    M("loading", "load-embedding-word-without-brackets", lambda c: (
        textual_inversion.load_embedding(c.pipe, _embedding_file(c, token="sks"))),
      _refused("token", "'sks'", "angle brackets"), needs_pipe=True),
    M("loading", "load-embedding-tilde-path", _home_embedding, Behaves(_check_knows_star),
      needs_pipe=True),
    M("loading", "unclip-folder-with-pickle-weights", lambda c: unclip.load_pipeline(
        _unclip_folder(c, {"unet": {"config.json": b"{}", "diffusion_pytorch_model.bin": b"x"}})),
      _refused("model", "unet", "only pickle weights ['diffusion_pytorch_model.bin']")),
    M("loading", "unclip-folder-without-its-unet", lambda c: unclip.load_pipeline(
        _unclip_folder(c, {}, missing=("unet",))), _refused("model", "unet",
                                                            "a unet/ subfolder was expected")),
    M("loading", "unclip-folder-garbage-weights", lambda c: unclip.load_pipeline(
        _unclip_folder(c, {"image_encoder": {"config.json": b"{}",
                                             "model.safetensors": b"<html>" * 9}})),
      _refused("model", "model.safetensors", "do not start like one")),
    M("loading", "training-checkpoint-truncated", lambda c: training._load_ckpt(
        _truncated(_ckpt(c)), {"vae": training.make_vae()}, None),
      _refused("path", "vae.ckpt.safetensors", "a checkpoint written by sdkit.training")),
]


def _lora_state(c) -> dict:
    from safetensors.torch import load_file

    return load_file(_lora_file(c, "state.safetensors"))


def _lora_keys(c) -> list[str]:
    return [k for k in _lora_state(c) if ".to_q." in k]


def _relabelled(path: str, **meta) -> str:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        old = f.metadata()
    save_file(load_file(path), path, metadata=old | meta)
    return path


def _ckpt(c) -> str:
    path = c.tmp / "vae.ckpt.safetensors"
    vae = training.make_vae()
    opt = torch.optim.AdamW(vae.parameters())
    training._save_ckpt(path, {"vae": vae}, opt, 1)
    return str(path)
