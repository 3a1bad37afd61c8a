"""Pretrained backbone weights through each library's own cached, hash-checked loader, never a download of ours.

    state = torchvision_state("resnet152", ResNet152_Weights.IMAGENET1K_V2)  # $TORCH_HOME/hub/checkpoints/...
    with library_download("timm/convnext_tiny", "fb_in22k", hub_files("timm", cfg)):
        model = timm.create_model("convnext_tiny.fb_in22k", pretrained=True)  # into the Hugging Face cache

torchvision: `WeightsEnum.get_state_dict(check_hash=True)` (torch.hub.load_state_dict_from_url) creates the
checkpoints folder, downloads into a uniquely named `.partial` file beside the target, checks the sha256 prefix
that the file name carries, and only then renames it into place: a failed, interrupted (Ctrl-C, SIGTERM) or
corrupt download leaves no file that a later run would take for the weights. A copy placed there by hand is
checked against the same prefix here before use (torch.hub trusts any file it finds). timm and open_clip fetch
through huggingface_hub (HF_HOME, HF_HUB_OFFLINE=1), which writes `.incomplete` blobs and links them into its
cache only once whole, under their sha256 (an LFS file's ETag): the blob is checked against that name before use
and after a download, and removed when it does not match (huggingface_hub itself checks only the size). timm's
and open_clip's URL-hosted weights go through their own hash-checked downloads.

A download that fails is one line naming the file to place and where. Under torchrun, jobs build the encoder
inside distributed.node_main_first, so one process per node downloads and the others read what it cached.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from captioner.errors import CaptionerError, shorten
from captioner.files import update_digest
from captioner.model.backbone_weights import looks_like_file
from captioner.progress import show_progress

log = logging.getLogger("captioner")

SHA256_NAME = re.compile(r"[0-9a-f]{64}")
STALE_PARTIAL_S = 3600  # a .partial file untouched this long is left by a killed (SIGKILL) download


def names_library_weights(weights: str | None) -> bool:
    """Whether encoder.weights names a library's weights (which may need a download), not a file or nothing."""
    return bool(weights) and not looks_like_file(weights)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {shorten((str(e).strip().splitlines() or [''])[0], 200)}".rstrip(": ")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    update_digest(digest, path, "weights file")
    return digest.hexdigest()


def _verify_placed(path: Path) -> None:
    """A file found in the cache is checked against the sha256 prefix in its name (resnet152-f82ba261.pth),
    as torch.hub checks a download: a truncated or foreign copy placed by hand is refused, not loaded."""
    match = torch.hub.HASH_REGEX.search(path.name)
    if not match or not match.group(1):
        return
    digest = _sha256(path)
    if not digest.startswith(match.group(1)):
        raise CaptionerError(f"{path} is not the file its name promises (its sha256 starts {digest[:8]}, not "
                             f"{match.group(1)}): delete it to download it again, or place a good copy there")


def _remove_stale_partials(folder: Path, name: str) -> None:
    """torch.hub removes its .partial file on any error or Ctrl-C; only a killed process leaves one behind."""
    for partial in folder.glob(name + ".*.partial"):
        with contextlib.suppress(OSError):
            if time.time() - partial.stat().st_mtime > STALE_PARTIAL_S:
                partial.unlink()


def torchvision_state(arch: str, weights) -> dict:
    """The state_dict of a torchvision weights enum member, from $TORCH_HOME/hub/checkpoints (downloaded there,
    hash-checked, when missing)."""
    file = os.path.basename(urlparse(weights.url).path)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    cached = folder / file
    if cached.is_file():
        _verify_placed(cached)
    elif folder.is_dir():
        _remove_stale_partials(folder, file)
    if not cached.is_file():
        log.info("downloading %s %s weights from %s to %s", arch, weights.name, weights.url, cached)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torch.hub prints "Downloading: ..." to stdout, ours
            return dict(weights.get_state_dict(progress=show_progress(), check_hash=True, weights_only=True))
    except Exception as e:  # noqa: BLE001 - offline machines fail in many ways (URLError, IncompleteRead, ...)
        reason = _first_line(e)
        if cached.is_file():  # downloaded and hash-checked, or placed and checked above: it does not load
            raise CaptionerError(f"{arch} {weights.name} weights {cached} cannot be read ({reason}): delete it to "
                                 f"download it again, or set encoder.weights to a local .pth file") from None
        if "invalid hash value" in str(e):
            raise CaptionerError(f"the download of {file} is incomplete or corrupt (its sha256 does not start with the "
                                 f"{torch.hub.HASH_REGEX.search(file).group(1)} its name carries) and was not "
                                 f"kept: try again, or place a good copy at {cached}") from None
        raise CaptionerError(f"could not download {file} ({reason}; no network?): place it at {cached} "
                             f"(from {weights.url}), or set encoder.weights to a local .pth file") from None


@dataclass(frozen=True)
class LibraryFile:
    """Where a timm or open_clip weights tag comes from: a Hugging Face Hub repo's file, or a plain URL."""
    file: str  # the name the library tries first
    repo_id: str = ""  # Hub repo ("timm/convnext_tiny.fb_in22k"); empty for a URL
    url: str = ""
    folder: str = ""  # the library's cache folder for a URL download
    others: tuple[str, ...] = ()  # names the library falls back to (pytorch_model.bin after model.safetensors)

    def place(self) -> str:
        """How to get the file onto a machine without a network, in words."""
        if not self.repo_id:
            return f"place it at {Path(self.folder) / self.file} (from {self.url})"
        repo_folder = "models--" + self.repo_id.replace("/", "--")
        return (f"where the network allows, run `hf download {self.repo_id} {self.file}` "
                f"(https://huggingface.co/{self.repo_id}) and copy that machine's {repo_folder} folder "
                f"(in its Hugging Face cache) into {_hub_cache()}")

    def cached_paths(self) -> list[Path]:
        """The copies in the library's cache (for the Hub: snapshot entries, which link to sha256-named blobs)."""
        if not self.repo_id:
            path = Path(self.folder) / self.file
            return [path] if path.is_file() else []
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return []
        found = (try_to_load_from_cache(self.repo_id, name) for name in (self.file, *self.others))
        return [Path(path) for path in found if isinstance(path, str)]

    def verify(self) -> bool:
        """Whether a copy is cached; one whose content does not hash to the name it is kept under is refused."""
        paths = self.cached_paths()
        for path in paths:
            if self.repo_id:
                _verify_blob(path, f"{path.name} of {self.repo_id}", self.place())
            else:
                _verify_placed(path)
        return bool(paths)


def _verify_blob(entry: Path, what: str, place: str) -> None:
    """The Hugging Face cache keeps an LFS file (every weights file) as blobs/<its sha256>, linked from the
    snapshot: content that does not hash to that name is removed (the library would reuse it forever)."""
    blob = Path(os.path.realpath(entry))
    if not SHA256_NAME.fullmatch(blob.name):  # a copied (not linked) snapshot file, or a small git file
        return
    digest = _sha256(blob)
    if digest != blob.name:
        kept = []  # a shared cache: another user's file may not be ours to remove
        for path in (entry, blob):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                kept.append(f"{path} ({e.strerror or e})")
        bad = f"{what} in the Hugging Face cache is incomplete or corrupt (sha256 {digest[:12]}..., not the " \
              f"{blob.name[:12]}... it is kept under)"
        if kept:
            raise CaptionerError(f"{bad} and could not be removed: {'; '.join(kept)}; have its owner or an "
                                 f"administrator delete it, or set HF_HOME to a cache of your own")
        raise CaptionerError(f"{bad} and was removed: run again to download it, or {place}")


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants
    except ImportError:
        return "~/.cache/huggingface/hub"
    return str(constants.HF_HUB_CACHE)


def hub_files(library: str, cfg: dict | None) -> LibraryFile | None:
    """The file a timm pretrained_cfg or an open_clip pretrained config fetches: both libraries try a
    .safetensors name on the Hub first, then the pickle-free-loaded .bin."""
    cfg = cfg or {}
    if library == "timm":
        repo, url, folder = cfg.get("hf_hub_id"), cfg.get("url"), str(Path(torch.hub.get_dir()) / "checkpoints")
        files = ("model.safetensors", "pytorch_model.bin")
    else:
        repo, url, folder = (cfg.get("hf_hub") or "").rstrip("/"), cfg.get("url"), "~/.cache/clip"
        named = ""
        if repo.count("/") > 1:  # "org/name/file.bin" names its file
            repo, _, named = repo.rpartition("/")
        files = (("open_clip_model.safetensors", "open_clip_pytorch_model.bin") if not named else
                 (named[:-4] + ".safetensors", named) if named.endswith((".bin", ".pth")) else (named,))
    if repo:
        return LibraryFile(files[0], repo_id=repo, others=files[1:])
    if url:
        return LibraryFile(os.path.basename(urlparse(url).path), url=url, folder=os.path.expanduser(folder))
    return None


@contextlib.contextmanager
def library_download(arch: str, tag: str, source: LibraryFile | None):
    """A timm / open_clip pretrained build: the cached file is checked against its sha256 before use (and a fresh
    download after), and errors become one line: the file to place and where when it could not be downloaded,
    the reason when a cached file does not load."""
    was_cached = source is not None and source.verify()  # checked before use
    try:
        yield
    except CaptionerError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub's offline errors come in many types
        reason = _first_line(e)
        if source is None:
            raise CaptionerError(f"{arch} weights {tag} could not be loaded ({reason}); set encoder.weights to a "
                                 f"local file") from None
        if not was_cached:
            source.verify()  # a corrupt download is named and removed
        if source.cached_paths():
            raise CaptionerError(f"{arch} weights {tag}: the cached {source.file} of "
                                 f"{source.repo_id or source.url} cannot be loaded ({reason}); delete it to download "
                                 f"it again, or set encoder.weights to a local file") from None
        raise CaptionerError(f"could not download {source.file} for {arch} weights {tag} ({reason}; no network?): "
                             f"{source.place()}, or set encoder.weights to a local file") from None
    if source is not None and not was_cached:
        source.verify()  # what the library just downloaded; the model built from it is dropped if it is corrupt
