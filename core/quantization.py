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
