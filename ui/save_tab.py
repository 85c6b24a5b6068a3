"""The Save & push tab: save the canonical checkpoint on the server (owner), push it to the Hub.

The server names the save folder (under APP_SAVE_DIR, from the model, revision and quantization);
no request carries a path. Pushing uses the caller's own Hugging Face sign-in on a Space, and the
server's token (HF_TOKEN or the cached login) only for the owner. An error stays in the output area
after its toast is gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from core import card, hub, saves
from server.access import Action, push_token
from server.context import AppContext
from ui import jobs, render
from ui.errors import last_error
from ui.handlers import handler


@dataclass
class SaveTab:
    save_button: gr.Button
    push_button: gr.Button


def save_model(ctx: AppContext, request: gr.Request = None, profile: gr.OAuthProfile | None = None,
               progress=gr.Progress()) -> str:
    caller = ctx.admit(request, profile, Action.SAVE)

    def work(engine, job):
        loaded = engine.current
        job.progress(0.05, "Answering the card's sample prompt")
        facts = card.measure(loaded)
        job.progress(0.3, "Writing the checkpoint")
        return hub.save(loaded, saves.target_for(loaded.spec, ctx.settings.save_dir), facts)

    return render.saved(jobs.run(ctx, work, "save", request, progress), show_path=caller.is_owner)


def push_to_hub(ctx: AppContext, repo_id: str, private: bool = True, commit_message: str = "Upload quantized model",
                request: gr.Request = None, profile: gr.OAuthProfile | None = None,
                oauth_token: gr.OAuthToken | None = None, progress=gr.Progress()) -> str:
    settings = ctx.settings
    caller = ctx.caller(request, profile)
    action = Action.PUSH_SERVER if caller.is_owner else Action.PUSH_OWN
    ctx.admit(request, profile, action)
    repo = str(repo_id or "").strip()
    hub.check_repo_id(repo)
    token = push_token(caller, settings, oauth_token.token if oauth_token is not None and settings.on_space
                       else None, repo)
    message = str(commit_message or "").strip()[:500] or "Upload quantized model"

    def work(engine, job):
        job.progress(0.1, "Saving (or verifying the earlier save), then uploading")
        loaded = engine.current
        return hub.push(loaded, repo, token=token, private=bool(private), commit_message=message,
                        folder=saves.target_for(loaded.spec, settings.save_dir), facts=lambda: card.measure(loaded))

    return render.pushed(jobs.run(ctx, work, "push", request, progress))


def build(ctx: AppContext) -> SaveTab:
    settings = ctx.settings
    gr.Markdown("Saving writes the canonical checkpoint (fast path reversed for the save, restored after it) into "
                "a folder the server names from the model and its quantization, under its save folder.")
    save_button = gr.Button("Save on the server")
    save_out = gr.Markdown(elem_id="save-out")
    if settings.on_space:
        gr.LoginButton()
        gr.Markdown("Sign in to push a copy of the loaded model to **your own** account.")
    else:
        gr.Markdown("Pushing uses `HF_TOKEN` or the cached `hf auth login` of the machine running the app (owner "
                    "only).")
    with gr.Row():
        repo_id = gr.Textbox(label="Repo id", value="", placeholder="your-name/smollm2-135m-nf4", scale=3,
                             min_width=220)
        private = gr.Checkbox(label="Private", value=True, scale=1, min_width=100)
    commit_message = gr.Textbox(label="Commit message", value="Upload quantized model")
    push_button = gr.Button("Push to the Hub", variant="primary")
    push_out = gr.Markdown(elem_id="push-out")

    save_button.click(handler(ctx, save_model), None, save_out, api_name="save_model", concurrency_limit=None,
                      show_progress_on=[save_out]).failure(last_error, None, save_out, api_visibility="private",
                                                           queue=False)
    push_button.click(handler(ctx, push_to_hub), [repo_id, private, commit_message], push_out, api_name="push_to_hub",
                      concurrency_limit=None, show_progress_on=[push_out]).failure(
        last_error, None, push_out, api_visibility="private", queue=False)
    return SaveTab(save_button=save_button, push_button=push_button)
