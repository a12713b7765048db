"""Where a checkpoint comes from: a local directory, or a Hugging Face Hub repo id fetched with
huggingface_hub (its cache, offline mode and errors turned into one clear line)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dgemma import genconfig
from dgemma.errors import LoadError

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]


def resolve_source(source: str | os.PathLike, configs_only: bool = False) -> Path:
    """A local checkpoint directory, or a Hub repo id fetched with huggingface_hub (cache and offline aware).

    ``configs_only`` fetches only the config files from the Hub (``dgemma info``).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists():
        raise LoadError(f"{text} is a file; pass the checkpoint directory that contains it")
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or not re.fullmatch(r"[\w.\-]+/[\w.\-]+", text):
        raise LoadError(f"no checkpoint directory at {text} (and it is not a Hub repo id like owner/name)")
    configs = ["config.json", genconfig.GENERATION_FILE, genconfig.DGEMMA_FILE]
    return _download(text, configs if configs_only else _HUB_PATTERNS)


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError)

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise LoadError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline or HF_HUB_OFFLINE=1); download it once with network access or pass a local directory"
        ) from None
    except GatedRepoError:
        raise LoadError(f"{repo_id} is gated on the Hub: accept its licence and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise LoadError(f"no model named {repo_id} on the Hugging Face Hub (or it is private)") from None
    except OSError as e:  # network failures surface as OSError subclasses (requests/httpx errors)
        raise LoadError(f"could not download {repo_id} from the Hugging Face Hub: {e}") from None
