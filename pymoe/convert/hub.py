"""Where a checkpoint comes from: a local folder, or a Hugging Face hub repo
fetched (or found in the local cache, also offline) with huggingface-hub.
Only what the converter reads is downloaded: config, tokenizer and
safetensors files."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# config, tokenizer (all formats llama.cpp's vocab can come from), chat template, weights
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not source.endswith((".gguf", ".safetensors"))


def resolve(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    tqdm_class: Any = None,
) -> tuple[Path, str]:
    """(folder holding the checkpoint, a label for it). A path that exists is
    used as it is; otherwise `source` must be a hub repo id, which is fetched
    into the hub cache (or `local_dir`) unless the files are already there."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"'{path}' is a file; hint: pass the model's folder (the one with config.json)")
        return path, path.resolve().name
    text = str(source)
    if not looks_like_repo_id(text):
        raise FileNotFoundError(
            f"'{text}' is neither a folder nor a hub repo id (owner/name); hint: check the path or the repo id"
        )
    return _snapshot(text, revision=revision, local_dir=local_dir, cache_dir=cache_dir, tqdm_class=tqdm_class), text


def _snapshot(
    repo_id: str,
    *,
    revision: str | None,
    local_dir: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    tqdm_class: Any,
) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError as e:
        raise ImportError(
            f"fetching '{repo_id}' needs huggingface-hub; hint: pip install huggingface-hub, or pass a local folder"
        ) from e
    where = f"--local-dir {local_dir}" if local_dir else f"the hub cache ({cache_dir or constants.HF_HUB_CACHE})"
    get_it = (
        f"hint: on a machine with internet run `hf download {repo_id}"
        + (f" --revision {revision}" if revision else "")
        + (f" --local-dir {local_dir}" if local_dir else "")
        + " --include '*.json' '*.safetensors' 'tokenizer.model' '*.jinja'`"
        + (" and copy the folder here" if local_dir else " and copy ~/.cache/huggingface/hub here")
        + ", or pass the model's folder"
    )
    kwargs: dict[str, Any] = {
        "repo_id": repo_id,
        "revision": revision,
        "allow_patterns": ALLOW_PATTERNS,
        "local_dir": local_dir,
        "cache_dir": cache_dir,
    }
    if tqdm_class is not None:
        kwargs["tqdm_class"] = tqdm_class
    try:
        folder = huggingface_hub.snapshot_download(**kwargs)
    except errors.LocalEntryNotFoundError as e:
        offline = "offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "unreachable"
        raise FileNotFoundError(f"'{repo_id}' is not in {where} and the hub is {offline}; {get_it}") from e
    except errors.GatedRepoError as e:
        raise PermissionError(
            f"'{repo_id}' is gated; hint: accept its license on huggingface.co and log in with `hf auth login`"
        ) from e
    except errors.RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"hub repo '{repo_id}' does not exist or is private; hint: check the id, or log in with `hf auth login`"
        ) from e
    except errors.RevisionNotFoundError as e:
        raise FileNotFoundError(f"'{repo_id}' has no revision '{revision}'; hint: check --revision") from e
    except errors.HfHubHTTPError as e:
        raise OSError(f"downloading '{repo_id}' failed: {e}; {get_it}") from e
    return Path(str(folder))
