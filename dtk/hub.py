"""Local-only access to the Hugging Face hub cache: dtk never downloads at run time."""

from __future__ import annotations

from pathlib import Path

from dtk.errors import BadInput


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def cached_snapshot(repo_id: str, option: str = "--model") -> Path:
    """The local snapshot directory of ``repo_id``, or a one-line error on how to get it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: all mean "not here"
        raise BadInput(
            f"{option} {repo_id}: no such directory, and no hub model '{repo_id}' in the local cache "
            f"({HF_HUB_CACHE}); dtk does not download at run time: fetch it once with "
            f"`hf download {repo_id}` (or point HF_HOME at a cache that has it), or pass a local path"
        ) from None


def local_path(spec: str, option: str) -> Path:
    """A file or directory on disk, else a hub id from the local cache."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if looks_like_hub_id(spec):
        return cached_snapshot(spec, option)
    raise BadInput(f"{option} {spec}: no such file or directory")
