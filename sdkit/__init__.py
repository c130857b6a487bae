"""sdkit: the helper package behind the Stable Diffusion teaching kit.

The kit is a book of Jupyter notebooks (in `notebooks/`) backed by this one small package,
in the style of d2l.ai: notebook *n* teaches an idea by building it in the open, and the
code worth keeping moves into the sdkit module that pairs with it, so later notebooks can
call it in one line instead of copying cells.

The layering rule (tests/test_layering.py enforces it):

- The **ground** (`GROUND`, bottom first): input checks, torch's threads, the device,
  pictures in and out (and through the VAE), the shapes world with its checker, and the
  pipeline loader with the kit's defaults. Each ground module imports only the ground
  modules before it.
- Above it, **one module per notebook** (`NOTEBOOK_MODULES`: notebook number -> its
  modules; a notebook whose module would pass 500 lines gets several, in this order). A
  notebook's module imports only the ground, modules of lower-numbered notebooks, and the
  modules listed before it for its own notebook.
- No import cycle, and every sdkit import sits at the top of its module, never inside a
  function.

Importing `sdkit` stays light (torch and the device helpers only); the other modules are
imported by name, e.g. `from sdkit import shapes`. `sdkit.load_pipeline` is looked up lazily.

Side effect of `import sdkit`: it sets torch's thread counts for this process
(`sdkit.threads.apply()`: half the CPUs this process may use, within a container's CPU quota,
at least 1; `SDKIT_THREADS=N` or `auto` overrides it, and a bad value makes the import fail
with the kit's error), so that several kernels on one machine do not fight over its cores.
`sdkit.threads.describe()` says what was chosen and why.
"""

import logging as _logging

from . import threads
from .device import DeviceChoice, DeviceError, describe_device, get_device

threads.apply()

# Loading a diffusers pipeline makes transformers warn "`CLIPImageProcessor` requires torchvision
# (not installed); falling back to `CLIPImageProcessorPil`" (red in every notebook). The kit
# cannot pin torchvision: the package index's only 0.28.0 wheel is the CUDA build, which fails
# to import with the CPU torch (missing libtorch_cuda.so), and the PIL processor loses nothing
# here. Drop that one message (stdlib logging: transformers is not imported for it).
_logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())

__version__ = "0.1.0"

GROUND = ("checks", "threads", "device", "images", "figures", "shapes", "pipeline")
NOTEBOOK_MODULES = {
    1: ("noising",),
    2: ("sampling", "sampling_views", "samplers"),
    3: ("unet", "unet_views"),
    4: ("attention", "clip"),
    5: ("latents",),
    6: ("guidance", "widgets"),
    7: ("generation", "bench"),
    8: ("img2img",),
    9: ("inpainting",),
    10: ("finetune", "textual_inversion", "lora", "hypernetwork"),
    11: ("variations", "unclip"),
    12: ("checkpoints", "grounding", "training", "evaluation"),
}

__all__ = [
    "DeviceChoice",
    "DeviceError",
    "GROUND",
    "NOTEBOOK_MODULES",
    "__version__",
    "describe_device",
    "get_device",
    "load_pipeline",
]


def __getattr__(name):
    # PEP 562: `sdkit.load_pipeline` without importing diffusers at `import sdkit`.
    if name == "load_pipeline":
        import importlib

        return importlib.import_module(".pipeline", __name__).load_pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
