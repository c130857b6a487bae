"""sdkit: the helper package behind the Stable Diffusion teaching kit.

The kit is a book of Jupyter notebooks (in `notebooks/`) backed by this one
small package, in the style of d2l.ai: notebook *n* teaches an idea by building
it in the open, and the code worth keeping moves into the sdkit module that
pairs with it, so later notebooks can call it in one line instead of copying
cells. `notebooks/00_start_here.ipynb` lists the pairs.

Importing `sdkit` stays light (torch and the device helpers only). Heavier
modules are imported by name when a notebook needs them, e.g.
`from sdkit import shapes`. `sdkit.load_pipeline` is looked up lazily, so
`import sdkit` never pulls in diffusers.
"""

from .device import DeviceChoice, DeviceError, describe_device, get_device

__version__ = "0.1.0"

__all__ = [
    "DeviceChoice",
    "DeviceError",
    "__version__",
    "describe_device",
    "get_device",
    "load_pipeline",
]


def __getattr__(name):
    # PEP 562: resolve heavy attributes on first use, not at import time.
    if name == "load_pipeline":
        from .pipeline import load_pipeline

        return load_pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
