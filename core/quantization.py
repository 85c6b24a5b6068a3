"""bitsandbytes quantization modes: a registry from the user's name to a `BitsAndBytesConfig` builder.

transformers 5 has no `load_in_4bit=` keyword on `from_pretrained`; every mode goes through
`BitsAndBytesConfig`, which these builders fill from a `QuantSpec`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import BitsAndBytesConfig

from core.errors import SpecError
from core.spec import QuantSpec

# lm_head stays in 16/32-bit in every mode: bitsandbytes' own default, and quantizing it hurts quality most.
ALWAYS_SKIPPED = ("lm_head",)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "uint8": torch.uint8}[name]


def _skip(quant: QuantSpec) -> list[str]:
    return list(dict.fromkeys([*ALWAYS_SKIPPED, *quant.skip_modules]))


def _int8(quant: QuantSpec) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_8bit=True,
        llm_int8_threshold=quant.int8_threshold,
        llm_int8_skip_modules=_skip(quant),
        llm_int8_enable_fp32_cpu_offload=quant.fp32_cpu_offload,
    )


def _four_bit(kind: str) -> Callable[[QuantSpec], BitsAndBytesConfig]:
    def build(quant: QuantSpec) -> BitsAndBytesConfig:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=kind,
            bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_quant_storage=torch_dtype(quant.quant_storage),
            llm_int8_skip_modules=_skip(quant),
            llm_int8_enable_fp32_cpu_offload=quant.fp32_cpu_offload,
        )
    return build


BUILDERS: dict[str, Callable[[QuantSpec], BitsAndBytesConfig]] = {
    "int8": _int8,
    "fp4": _four_bit("fp4"),
    "nf4": _four_bit("nf4"),
}


def bitsandbytes_config(quant: QuantSpec) -> BitsAndBytesConfig | None:
    """None for mode 'none'; the matching config otherwise."""
    if quant.mode == "none":
        return None
    try:
        return BUILDERS[quant.mode](quant)
    except KeyError:
        raise SpecError("quantization", quant.mode, f"choose one of none, {', '.join(BUILDERS)}") from None


def describe(quant: QuantSpec) -> str:
    """One line for reports and model cards."""
    if quant.mode == "none":
        return "none (full precision)"
    if quant.mode == "int8":
        return f"LLM.int8() 8-bit, outlier threshold {quant.int8_threshold:g}" + (
            ", fp32 CPU offload" if quant.fp32_cpu_offload else "")
    double = ", double quantization" if quant.double_quant else ""
    return (f"4-bit {quant.mode.upper()}, compute dtype {quant.compute_dtype}{double}, "
            f"storage {quant.quant_storage}")


# ----------------------------------------------------------------------------- modules kept in higher precision


def kept_modules(model) -> tuple[str, ...]:
    """Names of the modules a model asks to keep in higher precision (T5: 'wo'). transformers 5.24 leaves them out of
    bitsandbytes quantization in every mode, upcasts `_keep_in_fp32_modules` to fp32 only for a float16 load (for
    a bfloat16 or float32 one they keep the load dtype), and `_keep_in_fp32_modules_strict` for bfloat16 too."""
    return tuple(sorted(set(getattr(model, "_keep_in_fp32_modules", None) or ())
                        | set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())))


def name_matcher(patterns) -> Callable[[str], bool]:
    """Whether a parameter name falls under `patterns`, matched as transformers matches its keep-in-fp32 plan (a search
    of each pattern in the name), so the estimate and the load agree on which tensors are meant."""
    if not patterns:
        return lambda name: False
    from transformers.core_model_loading import build_glob_alternation

    alternation = build_glob_alternation(list(patterns))[0]
    return lambda name: alternation.search(name) is not None


def fp32_upcast(model, dtype: str) -> Callable[[str], bool]:
    """Parameters transformers loads in float32 although the model loads in `dtype` (its dtype plan)."""
    plan = model._get_dtype_plan(torch_dtype(dtype)) if hasattr(model, "_get_dtype_plan") else {}
    return name_matcher([name for name, kept in plan.items() if kept == torch.float32])
