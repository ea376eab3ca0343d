"""The supervision settings' names, in a module without pydantic so training code (and the GPU smoke
script, which runs where only torch is installed) can check a setting without the params layer."""

from __future__ import annotations

import typing
from typing import Literal

Supervision = Literal["image", "mixed", "pixel"]
SUPERVISIONS: tuple[str, ...] = typing.get_args(Supervision)
