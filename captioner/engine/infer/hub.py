"""The Hugging Face Hub, through its own client (the optional `[hub]` extra: pip install "captioner[hub]").

    folder = download("owner/model")                 # a local folder in the Hub's cache (~/.cache/huggingface)
    url = upload("model/", "owner/model")            # creates the repo when needed, then uploads the folder

Only model folders travel this way (config.json + model.safetensors + vocab.json + README.md): loading one runs
no pickle, whoever wrote it. Offline, a repo already in the cache still loads (HF_HUB_OFFLINE=1 skips the network).
Tests replace `client()` with a stand-in that serves a local folder.
"""
from __future__ import annotations

import re
from pathlib import Path

from captioner.errors import CaptionerError

# owner/name as the Hub spells repo ids: letters, digits, '-', '_', '.'; no '..', not starting with '-' or '.'
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".yaml", ".yml")
INSTALL_HINT = 'pip install "captioner[hub]"'


def looks_like_repo_id(name: str) -> bool:
    """Whether name reads as a Hub repo id ("owner/model") rather than a local path that does not exist."""
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.lower().endswith(_FILE_SUFFIXES)


def client():
    """The huggingface_hub module; one line saying how to install it when it is missing."""
    try:
        import huggingface_hub
    except ImportError:
        raise CaptionerError(f"loading or pushing a Hugging Face Hub model needs huggingface_hub: {INSTALL_HINT}") \
            from None
    return huggingface_hub


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of repo_id's snapshot, downloaded into (or found in) the Hub's cache."""
    from captioner import __version__
    try:
        hub = client()
    except CaptionerError:
        raise CaptionerError(f"{repo_id} is not a file or folder here; to load it from the Hugging Face Hub, "
                             f"{INSTALL_HINT}") from None
    try:
        folder = hub.snapshot_download(repo_id, revision=revision, library_name="captioner",
                                       library_version=__version__)
    except Exception as e:  # noqa: BLE001 - offline, no such repo, gated, a bad revision: one line for all
        raise CaptionerError(f"{repo_id} is not a file or folder here, and the Hugging Face Hub could not provide "
                             f"it ({_reason(e)})") from None
    return Path(folder)


def upload(folder: str | Path, repo_id: str, private: bool = False, message: str | None = None) -> str:
    """Upload a model folder to repo_id (created when missing; the login of `hf auth login` or $HF_TOKEN);
    returns the repo's URL."""
    if not looks_like_repo_id(repo_id):
        raise CaptionerError(f"--push {repo_id!r} is not a Hub repo id: give owner/name (e.g. alice/captioner-coco)")
    hub = client()
    api = hub.HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                          commit_message=message or f"captioner export of {Path(folder).name}")
    except Exception as e:  # noqa: BLE001 - not logged in, no right to write, offline: one line for all
        raise CaptionerError(f"could not push {folder} to the Hugging Face Hub as {repo_id} ({_reason(e)}); the "
                             f"folder is written: push it later with `hf upload {repo_id} {folder}`") from None
    return str(url)
