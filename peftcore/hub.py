"""Finding adapter files: a local folder, or a Hugging Face Hub repo id through
``huggingface_hub`` (revision, subfolder, token, cache, offline mode, its progress bars)."""
from __future__ import annotations

import os
from typing import Optional

from .errors import AdapterFileNotFoundError


def resolve_file(
    path_or_repo_id: str,
    filename: str,
    *,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    token=None,
    cache_dir: Optional[str] = None,
    local_files_only: bool = False,
    required: bool = True,
) -> Optional[str]:
    """Local path of ``filename``; None when it does not exist and ``required`` is False."""
    path_or_repo_id = os.fspath(path_or_repo_id)
    if os.path.isdir(path_or_repo_id):
        p = os.path.join(path_or_repo_id, subfolder or "", filename)
        if os.path.isfile(p):
            return p
        if required:
            raise AdapterFileNotFoundError(f"{p}: no such file")
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{path_or_repo_id}{'/' + subfolder if subfolder else ''}@{revision or 'main'}"
    try:
        return hf_hub_download(
            path_or_repo_id,
            filename,
            subfolder=subfolder or None,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    except HFValidationError as e:
        raise AdapterFileNotFoundError(
            f"{path_or_repo_id!r} is neither a local folder nor a valid Hub repo id ({e})"
        ) from None
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        if required:
            raise AdapterFileNotFoundError(f"{filename} not found in {where}: {type(e).__name__}: {e}") from None
        return None
