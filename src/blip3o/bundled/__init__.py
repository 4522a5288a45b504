"""The model shipped inside the package: the default of `blip3o generate`, `ask` and `demo`.

The trained ShapesWorld checkpoint lives in `blip3o/bundled/model/`, in the layout `Blip3o.save_pretrained`
writes (float16 storage, the DiT's matrices int8, keep it under 25 MB; it loads as float32). pyproject.toml's package-data carries the
folder into wheels. A source checkout may have no model there yet: `bundled_model_dir()` then says how to get
one instead of failing later on a missing file.

To bundle a trained model (tests/test_bundled.py checks the size limit once one is there):
    Blip3o.from_pretrained("runs/shapes/final").save_pretrained(model_path(), dtype=torch.float16, dit_int8=True)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

MODEL_SUBDIR = "model"
CONFIG_FILE = "config.json"  # blip3o.models.blip3o.CONFIG_FILE, not imported: this module must not load torch
NO_BUNDLED_MODEL = (
    "no bundled model in this install; pass --model PATH or train one with `blip3o train --preset shapes`"
)


class NoBundledModelError(FileNotFoundError):
    """This install carries no bundled model."""


def model_path() -> Path:
    """Where the bundled model lives in this install, whether or not it is there."""
    root = resources.files(__name__)
    # Installed packages are plain folders here (a zipped install would need resources.as_file).
    return Path(str(root)) / MODEL_SUBDIR


def bundled_model_dir() -> Path:
    """The bundled model's folder; NoBundledModelError if this install has none.

    A folder counts as a model once it has its top config.json, which `save_pretrained` writes last.
    """
    folder = model_path()
    if not (folder / CONFIG_FILE).is_file():
        raise NoBundledModelError(NO_BUNDLED_MODEL)
    return folder
