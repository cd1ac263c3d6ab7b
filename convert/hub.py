"""``--push-to-hub``: create the repository and upload the finished folder with huggingface_hub.

The token comes from huggingface_hub's usual places (``HF_TOKEN``, ``hf auth login``); it is never
printed, logged or written anywhere by lckv.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .sources import ConvertError, _is_connection_error

logger = logging.getLogger(__name__)


class PushError(ConvertError):
    """The upload failed; the converted folder is kept."""


def push_folder(folder: Path, repo_id: str, private: bool = False, commit_message: str = "lckv-convert") -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` to it; return the repository URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    keep = f"the converted model is kept at {folder}; upload it later with `hf upload {repo_id} {folder}`"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        logger.info("uploading %s to %s", folder, url)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    except Exception as e:  # noqa: BLE001 - translated into one line naming the fix
        raise PushError(f"{_push_error(e, repo_id)}; {keep}") from None
    return str(url)


def _push_error(e: Exception, repo_id: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled) or _is_connection_error(e):
        return "cannot push to the Hub: this machine is offline or the Hub is unreachable (HF_HUB_OFFLINE, network)"
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        if status in (401, 403):
            return (
                f"the Hub refused the upload to {repo_id} (HTTP {status}): log in with `hf auth login` or set HF_TOKEN "
                "to a token with write access to that namespace"
            )
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"the Hub refused the upload to {repo_id}: {first}"
    return f"push to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
