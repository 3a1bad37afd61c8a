"""The Hugging Face Hub, through its own client (the optional `[hub]` extra: pip install "captioner[hub]").

    folder = download("owner/model")                 # a local folder in the Hub's cache (~/.cache/huggingface)
    url = upload("model/", "owner/model")            # creates the repo when needed, then uploads the folder

Only model folders travel this way (config.json + model.safetensors + vocab.json + README.md): loading one runs
no pickle, whoever wrote it. Offline, a repo already in the cache still loads (HF_HUB_OFFLINE=1 skips the network).
A Hub that accepts the connection but never answers (a stalled proxy) fails after $CAPTIONER_HUB_TIMEOUT seconds
(default 10) without a byte, in one line; the limit is per connect and per read, never on a whole download.
Tests replace `client()` with a stand-in that serves a local folder.
"""
from __future__ import annotations

import math
import os
import re
from contextvars import ContextVar
from pathlib import Path

from captioner.errors import CaptionerError, shorten

# owner/name as the Hub spells repo ids: letters, digits, '-', '_', '.'; no '..', not starting with '-' or '.'
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".yaml", ".yml")
INSTALL_HINT = 'pip install "captioner[hub]"'
TIMEOUT_VARIABLE = "CAPTIONER_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 10.0  # seconds, as huggingface_hub's own HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT
# The timeout of the download() running in this thread (None outside one): what _bound_timeouts gives its requests.
_TIMEOUT: ContextVar[float | None] = ContextVar("captioner_hub_timeout", default=None)


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
    return f"{type(e).__name__}: {shorten((str(e).strip().splitlines() or [''])[0])}"


def timeout_seconds() -> float:
    """$CAPTIONER_HUB_TIMEOUT, or DEFAULT_TIMEOUT when unset: seconds the Hub may take to connect or send the
    next bytes."""
    raw = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise CaptionerError(f"{TIMEOUT_VARIABLE}={raw!r} is not a number of seconds above 0 (default "
                             f"{DEFAULT_TIMEOUT:g})")
    return seconds


def _bound_timeouts(request) -> None:
    """huggingface_hub request hook: inside download(), a request sent without a timeout gets ours per connect,
    read, write and pool wait (a value already set is kept); elsewhere it does nothing."""
    seconds = _TIMEOUT.get()
    if seconds is None:
        return
    timeout = request.extensions.get("timeout") or dict.fromkeys(("connect", "read", "write", "pool"))
    request.extensions["timeout"] = {kind: seconds if value is None else value for kind, value in timeout.items()}


def _hook_into(hub) -> None:
    """Add _bound_timeouts to huggingface_hub's shared httpx client (once).

    snapshot_download asks repo_info and the file list with timeout=None, which overrides a client-level timeout
    (set_client_factory's), so a Hub that never answers hangs forever; only the file requests are bounded
    (etag_timeout, HF_HUB_DOWNLOAD_TIMEOUT). A request hook reaches those calls without replacing a client factory
    the user set (set_client_factory would, and closes the shared client) or changing a global: it acts only
    inside download() in this thread (a ContextVar, as huggingface_hub flags its own download calls), so the
    user's own huggingface_hub calls in this process keep their timeouts. huggingface_hub 0.x (requests, no
    request hooks) is left as it is."""
    try:
        session = hub.get_session()
        hooks = session.event_hooks
        if _bound_timeouts not in hooks["request"]:
            session.event_hooks = {**hooks, "request": [*hooks["request"], _bound_timeouts]}
    except (AttributeError, KeyError, TypeError):
        pass


def _caught(e: BaseException, *names: str) -> bool:
    """Whether e, or an exception it was raised from, is of a class named with one of names (httpx's, httpx2's and
    requests' ReadTimeout / ConnectTimeout / ConnectError, the built-in TimeoutError / ConnectionError)."""
    seen: list[BaseException] = []
    while e is not None and not any(e is s for s in seen):
        if any(name in cls.__name__ for cls in type(e).__mro__ for name in names):
            return True
        seen.append(e)
        e = e.__cause__ or e.__context__
    return False


def _failure(hub, repo_id: str, e: Exception, seconds: float) -> str:
    """The one line for a download that failed with e."""
    constants = getattr(hub, "constants", None)
    endpoint = getattr(constants, "ENDPOINT", None) or "https://huggingface.co"
    offline = getattr(constants, "HF_HUB_OFFLINE", False) or _caught(e, "OfflineModeIsEnabled")  # a ConnectionError
    instead = ("give a local model folder instead, or with the repo in the Hub's cache (HF_HOME) set "
               "HF_HUB_OFFLINE=1")
    if not offline and _caught(e, "Timeout"):
        return (f"{repo_id} is not a file or folder here, and the connection to the Hugging Face Hub at {endpoint} "
                f"timed out (no answer in {seconds:g} s; {TIMEOUT_VARIABLE} sets it): check the network or proxy, "
                f"{instead}")
    if not offline and _caught(e, "ConnectError", "ConnectionError"):
        return (f"{repo_id} is not a file or folder here, and the Hugging Face Hub at {endpoint} could not be "
                f"reached ({_reason(e)}): check the network or proxy, {instead}")
    return f"{repo_id} is not a file or folder here, and the Hugging Face Hub could not provide it ({_reason(e)})"


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of repo_id's snapshot, downloaded into (or found in) the Hub's cache."""
    from captioner import __version__
    try:
        hub = client()
    except CaptionerError:
        raise CaptionerError(f"{repo_id} is not a file or folder here; to load it from the Hugging Face Hub, "
                             f"{INSTALL_HINT}") from None
    seconds = timeout_seconds()
    token = _TIMEOUT.set(seconds)
    try:
        _hook_into(hub)
        # etag_timeout bounds the per-file HEAD requests (run in huggingface_hub's worker threads, which the
        # hook does not see); the file bodies keep huggingface_hub's own per-read HF_HUB_DOWNLOAD_TIMEOUT
        folder = hub.snapshot_download(repo_id, revision=revision, library_name="captioner",
                                       library_version=__version__, etag_timeout=seconds)
    except Exception as e:  # noqa: BLE001 - offline, unreachable, no such repo, gated, a bad revision: one line
        raise CaptionerError(_failure(hub, repo_id, e, seconds)) from None
    finally:
        _TIMEOUT.reset(token)
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
