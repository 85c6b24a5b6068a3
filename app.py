"""Entry point: read the launch options, load the default model, build the page, launch.

    python app.py [--host 0.0.0.0] [--port 7860] [--share] [--auth alice:secret,bob:other] [--owners alice]
                  [--trust-remote-code] [--api] [--no-preload]

Every option has an environment variable too (see the README). Importing this module builds
nothing; `main()` does the work. The page itself is built in ui/, the engine lives in core/, and
what decides who may do what lives in server/.
"""

from __future__ import annotations

import hmac
import logging
import os
import sys

log = logging.getLogger("app")


def blocked_paths(settings) -> list[str]:
    """What Gradio's file route must never serve: saves, the model cache, the Hub cache, model folders."""
    from huggingface_hub import constants

    from core import default_model

    return [str(p) for p in (settings.save_dir, default_model.cache_root(), constants.HF_HUB_CACHE,
                             *settings.model_dirs)]


def login_check(settings):
    """Gradio's auth callback, comparing in constant time."""
    def check(user: str, password: str) -> bool:
        return any(hmac.compare_digest(user.encode(), u.encode()) & hmac.compare_digest(password.encode(), p.encode())
                   for u, p in settings.auth)
    return check if settings.auth else None


def trust_proxies(settings) -> None:
    """uvicorn's proxy-header setting, made explicit: it reads X-Forwarded-For only from the proxies APP_TRUST_PROXY
    names (none by default; on a Space, Hugging Face's), and takes the rightmost entry that is not one of them. Gradio
    builds uvicorn's Config itself, which reads this variable; left unset, uvicorn would believe any loopback peer."""
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(settings.trusted_proxies)


def main(argv: list[str] | None = None) -> None:
    from core import logs
    from server.settings import parse_args

    logs.configure()  # each library warning once, with what it means (core/logs.py)

    settings = parse_args(argv)
    if settings.start_problem():
        raise SystemExit(f"error: {settings.start_problem()}")
    for note in settings.warnings():
        log.warning(note)
    import gradio as gr
    from starlette.middleware import Middleware

    from core import default_model
    from server.context import AppContext
    from server.uploads import RefuseUploads
    from ui.blocks import CSS, build

    ctx = AppContext.create(settings)
    if settings.preload:
        from space.defaults import default_load_spec

        spec = default_load_spec(settings.trust_remote_code)
        if spec.is_embedded and not default_model.converted():
            log.info("First start: converting the embedded SmolLM2-135M-Instruct from GGUF into a checkpoint "
                     "(about 30 s, once; later starts take seconds).")
        log.info("Loading the default model…")
        ctx.worker.run(lambda engine, job: engine.load(spec), "load")
    routes = []
    if settings.api:
        from server import openai_api

        routes = openai_api.routes(ctx)
        log.info("OpenAI-compatible API on /v1 (%s)", "bearer key required" if settings.api_key else "no key: loopback")
    trust_proxies(settings)
    build(ctx).launch(server_name=settings.host, server_port=settings.port, share=settings.share,
                      app_kwargs={"routes": routes, "middleware": [Middleware(RefuseUploads)]},
                      auth=login_check(settings), blocked_paths=blocked_paths(settings), theme=gr.themes.Soft(),
                      css=CSS, show_error=True)


if __name__ == "__main__":
    main(sys.argv[1:])
