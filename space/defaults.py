"""Start-up defaults: which model the app loads before the first visitor arrives.

Locally and on CPU Spaces that is the embedded SmolLM2-135M-Instruct (no download). On a GPU Space,
APP_MODEL (a Hub id) and APP_QUANT (none/int8/fp4/nf4) pick a bigger default, for example
APP_MODEL=HuggingFaceTB/SmolLM2-1.7B-Instruct APP_QUANT=nf4 in the Space's variables.
"""

from __future__ import annotations

import os

from core.spec import LoadSpec, QuantSpec, parse_model


def default_load_spec() -> LoadSpec:
    model = parse_model(os.environ.get("APP_MODEL", ""))
    quant = os.environ.get("APP_QUANT", "none")
    fast = os.environ.get("APP_FAST_PATH", "0") == "1"
    return LoadSpec(model=model, quant=QuantSpec(mode=quant), fast_path=fast)
