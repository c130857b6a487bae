"""Textual inversion: a new word for a trained Stable Diffusion (Gal et al., 2022).

A new token such as ``<purple>`` gets one new row of the text encoder's token-embedding
matrix, initialised from a related word, and only that row trains on the model's own loss
(``finetune.diffusion_loss``); the UNet, the VAE and every other weight of the text encoder
stay frozen. The trainer works on copies of the tokenizer and text encoder, so the pipeline
you pass in is left exactly as it was. The learned word is saved as safetensors in
diffusers' own format (``pipe.load_textual_inversion`` reads it).

Left out: several vectors per word, training the UNet or the rest of the text encoder.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import checks, finetune, pipeline
from .checks import fail

TOKEN_RE = re.compile(r"^<[a-z][a-z0-9_-]*>$")  # a new word for textual inversion: "<star>"


def _check_token(tokenizer, token: str, init_word: str) -> int:
    """Refuse a token that is not a new word in angle brackets, or an ``init_word`` that is
    not one token; returns ``init_word``'s token id."""
    if not isinstance(token, str) or not TOKEN_RE.match(token):
        fail("token", token, "expected a new word in angle brackets, lower-case letters, digits, "
                             "'_' or '-', e.g. '<star>'")
    if token in tokenizer.get_vocab():
        fail("token", token, "expected a token the tokenizer does not know yet")
    if not isinstance(init_word, str):
        fail("init_word", init_word, "expected a str, a word the tokenizer has one token for")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if len(init_ids) != 1:
        fail("init_word", init_word, f"expected a word that is a single token; it splits into "
                                     f"{tokenizer.convert_ids_to_tokens(init_ids)}")
    return init_ids[0]


def _add_token(tokenizer, text_encoder, token: str, init_id: int) -> int:
    """Add ``token`` to the tokenizer and give it a row of the embedding matrix, copied from
    token ``init_id``; changes both in place and returns the new token id."""
    if tokenizer.add_tokens(token) != 1:  # pragma: no cover (checked by _check_token)
        fail("token", token, "the tokenizer refused to add it")
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        emb = text_encoder.get_input_embeddings().weight  # (V + 1, d)
        emb[token_id] = emb[init_id]
    return token_id


class _Frozen:
    """Context manager: requires_grad off for a module's parameters, restored on exit."""

    def __init__(self, *modules):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, r in zip(self.params, self.saved, strict=True):
            p.requires_grad_(r)
        return False


def train_textual_inversion(pipe, latents, captions, token: str = "<star>",
                            init_word: str = "triangle", steps: int = 100, lr: float = 1e-2,
                            batch_size: int = 8, seed: int = 0) -> finetune.FineTuneResult:
    """Textual inversion: learn the embedding of a new word ``token`` from pictures
    (``latents`` from ``finetune.encode_images``, ``captions`` that use ``token``).

    Works on copies of ``pipe.tokenizer`` and ``pipe.text_encoder`` (the pipeline passed in
    stays unchanged). The new token's row starts as ``init_word``'s; a gradient mask keeps
    every other row at exactly its old value (AdamW without weight decay leaves a parameter
    with zero gradient untouched). The UNet and VAE are frozen and shared.

    The batch must fit in memory (the error gives the estimate and the limit;
    ``SDKIT_MEMORY_LIMIT=32GiB`` raises it). A progress bar shows the steps; Jupyter's stop
    button (KeyboardInterrupt) and a non-finite loss (``lr`` too large: an error naming it)
    stop training, and ``pipe`` (tokenizer, embedding table, UNet's requires_grad) is as it
    was. Returns a ``FineTuneResult`` whose ``extra`` holds ``tokenizer``, ``text_encoder``,
    ``token`` and ``token_id``.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    torch.manual_seed(checks.check_seed(seed))
    init_id = _check_token(pipe.tokenizer, token, init_word)
    tokenizer = copy.deepcopy(pipe.tokenizer)
    text_encoder = copy.deepcopy(pipe.text_encoder)
    token_id = _add_token(tokenizer, text_encoder, token, init_id)
    steps, lr, batch_size, seed = finetune._check_train_args(steps, lr, batch_size, seed,
                                                             latents, captions, tokenizer)
    if not any(token in c for c in captions):
        fail("captions", captions[:2], f"expected captions that use the new token {token!r}")
    text_encoder.requires_grad_(False)
    weight = text_encoder.get_input_embeddings().weight  # (V, d)
    weight.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[token_id] = 1.0
    hook = weight.register_hook(lambda grad: grad * mask)  # only the new row gets a gradient
    ids = finetune._ids(tokenizer, captions).to(weight.device)  # (N, T)
    with _Frozen(pipe.unet):
        losses, seconds = finetune._train(
            f"textual inversion {token}", pipe.unet, [weight],
            lambda idx, _: text_encoder(ids[idx])[0],  # (B, T, d): the text encoder runs each step
            latents, steps, lr, batch_size, seed, pipeline.training_scheduler(pipe))
    hook.remove()
    weight.requires_grad_(False)
    text_encoder.eval()
    name = next(n for n, p in text_encoder.named_parameters() if p is weight)
    return finetune.FineTuneResult(
        "textual inversion",
        finetune._rebuild(pipe, tokenizer=tokenizer, text_encoder=text_encoder), losses,
        trained_parameters=weight.shape[1], seconds=seconds,
        trained_modules=[f"text_encoder.{name}[{token_id}]"],
        extra={"tokenizer": tokenizer, "text_encoder": text_encoder, "token": token,
               "token_id": token_id, "init_word": init_word})


def save_embedding(result: finetune.FineTuneResult, path) -> Path:
    """Save a learned word as safetensors in diffusers' format ``{token: vector (d,)}``;
    ``pipe.load_textual_inversion(path)`` of stock diffusers reads it back.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    finetune._check_result(result, "textual inversion")
    row = result.extra["text_encoder"].get_input_embeddings().weight[result.extra["token_id"]]
    path = finetune._out_path(path)
    save_file({result.extra["token"]: row.detach().float().cpu().contiguous()}, str(path))
    return path


def load_embedding(pipe, path):
    """A new pipeline whose copied tokenizer and text encoder know the word saved in
    ``path``. All or nothing: the file is checked (one token, one finite vector of the text
    encoder's width) before anything changes, and only copies change: ``pipe``'s tokenizer
    and embedding table are left exactly as they were, whatever happens.

    Introduced in notebooks/10_fine_tuning.ipynb.
    """
    state, _ = finetune._read(path, "a learned word written by save_embedding")
    if len(state) != 1:
        fail("path", str(path), f"expected one token in the file, found {list(state)[:4]}")
    (token, row), = state.items()
    init_id = _check_token(pipe.tokenizer, token, "a")
    d = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if row.shape != (d,) or not row.is_floating_point() or not torch.isfinite(row).all():
        fail("path", str(path), f"expected one finite vector of {d} numbers (this text "
                                f"encoder's width) for {token}; found {row.dtype} "
                                f"{tuple(row.shape)}")
    tokenizer, text_encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    token_id = _add_token(tokenizer, text_encoder, token, init_id)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[token_id] = row
    return finetune._rebuild(pipe, tokenizer=tokenizer, text_encoder=text_encoder)
