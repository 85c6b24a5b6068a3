"""The Gradio Blocks: one module per tab (model, chat, save & push, compare), the shared plumbing, and render.

No torch and no model logic here: handlers check access and limits (server/), submit jobs to the model
worker (core.worker) and render core's result dataclasses (render.py).
"""
