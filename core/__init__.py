"""The engine: quantized loading, placement planning, the reversible fast path, generation, save and push.

Importable without gradio. Modules: spec (requests and parsing), default_model (the embedded
SmolLM2), source (where a model comes from), quantization (bitsandbytes configs), placement
(device-map plans), loading, fastpath, generation, engine (the one model in memory), hub (save,
card, push), cuda_graphs (the graphed decode step), fit (will-it-fit estimates), quality
(perplexity and agreement), compare, cli.
"""
