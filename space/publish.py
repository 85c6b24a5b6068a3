"""Publish this repository as a Hugging Face Space: create it if missing, upload exactly what it needs.

    python -m space.publish your-name/quantized-llm [--private] [--hardware l4x1]

The token comes from HF_TOKEN or the cached `hf auth login`. The Space gets app.py, core/ (with its data),
ui/, server/, space/defaults.py, space/README.md as its README.md (the front matter that configures it)
and space/requirements.txt as its requirements.txt; files that are no longer part of it are deleted.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "ui", "server")
RENAMED = {"space/README.md": "README.md", "space/requirements.txt": "requirements.txt"}
EXTRA = ("app.py", "space/__init__.py", "space/defaults.py")


def space_files(root: Path = ROOT) -> dict[str, Path]:
    """Path in the Space -> file here."""
    files = {name: root / name for name in EXTRA}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files[path.relative_to(root).as_posix()] = path
    files.update({target: root / source for source, target in RENAMED.items()})
    return files


def publish(repo_id: str, token: str | None = None, private: bool = False, hardware: str | None = None,
            endpoint: str | None = None) -> str:
    """Creates or updates the Space; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True,
                    space_hardware=hardware)
    with tempfile.TemporaryDirectory() as staging:
        for name, source in space_files().items():
            target = Path(staging) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        commit = api.upload_folder(folder_path=staging, repo_id=repo_id, repo_type="space",
                                   commit_message="Publish the app", delete_patterns=["*.py", "**/*.py", "core/data/*"])
    return commit.commit_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m space.publish", description=__doc__.splitlines()[0])
    parser.add_argument("repo_id", help="your-name/space-name")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--hardware", default=None, help="for example l4x1, t4-small, a10g-small")
    args = parser.parse_args(argv)
    from huggingface_hub import get_token

    try:
        url = publish(args.repo_id, token=get_token(), private=args.private, hardware=args.hardware)
    except Exception as error:  # one line for the terminal; the token is never part of it
        from core.hub_errors import explain_hub_error

        print(f"error: {explain_hub_error(error, args.repo_id)}", file=sys.stderr)
        return 2
    print(f"published: {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
