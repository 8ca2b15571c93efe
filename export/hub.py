"""`edgert export ORG/NAME`: a Hugging Face repo id instead of a folder.

huggingface_hub resolves it: a download where the network reaches the hub, the local cache
otherwise (HF_HUB_OFFLINE=1, or no network: the cached snapshot of the revision asked for).
Only what the exporter reads is fetched: config, safetensors weights (and their index), the
generation config and the tokenizer files.
"""
from __future__ import annotations

import re
from pathlib import Path

WANTED = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
          "chat_template.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class HubError(Exception):
    """One line for the user."""


def looks_like_repo_id(source: str | Path) -> bool:
    """ORG/NAME that is not an existing path."""
    text = str(source)
    return bool(_REPO_ID.match(text)) and not Path(text).exists() and ".." not in text


def resolve(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of repo_id at revision (a branch, tag or commit; default main)."""
    try:
        import huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise HubError(f"{repo_id} is not a folder; to export a Hugging Face repo id, pip install huggingface_hub "
                       f"(or download it and give the folder)") from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=WANTED))
    except LocalEntryNotFoundError:
        raise HubError(f"{repo_id}{'@' + revision if revision else ''} is not in the local Hugging Face cache and the "
                       f"hub cannot be reached (offline); download it where there is a network, or give a folder") from None
    except HfHubHTTPError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{repo_id}: the Hugging Face hub refused: {first[:200]}") from None
    except (OSError, ValueError) as e:          # bad revision names, unreachable hosts, a full disk
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{repo_id}: {first[:200]}") from None
