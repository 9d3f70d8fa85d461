"""Names, not paths: a hub repo id (`owner/name`, at a revision) as a local snapshot directory,
through huggingface_hub and its on-disk cache. Offline (HF_HUB_OFFLINE=1) the cache is all
there is, and what it lacks is one line naming the repo, the file and the command that fetches it.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError

# What the hub accepts as a model id (namespace/name or name); anything else must be a local path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(name: str) -> bool:
    """A name to look up on the hub: not a path that exists here, and shaped like a repo id."""
    return not Path(name).exists() and HUB_ID.fullmatch(name) is not None


def is_repo_name(name: str) -> bool:
    """A hub id that names a repo where a file is expected (owner/name, no suffix), not a missing
    local file such as checkpoint.pt."""
    return is_hub_id(name) and not Path(name).suffix


def fetch_command(repo: str, revision: str | None = None, files: tuple[str, ...] = ()) -> str:
    return " ".join(["hf download", repo, *files, *(["--revision", revision] if revision else [])])


def snapshot(repo: str, revision: str | None = None, *, required: tuple[str, ...] = (),
             patterns: list[str] | None = None, what: str = "") -> Path:
    """The local directory of repo at revision (default: main), downloaded into the cache when
    online. `required` files are fetched (or looked up) first, so a repo without them, or a cache
    without them offline, is named by the file; `patterns` limit the rest of the snapshot. `what`
    ("LM ", ...) begins the error messages."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = what + (f"{repo}@{revision}" if revision else repo)
    offline = constants.HF_HUB_OFFLINE
    name = ""
    try:
        for name in required:
            hf_hub_download(repo, name, revision=revision)
        name = ""
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        what = f"{name} is not in" if name else "is not in"
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise CheckpointError(f"{at}: no such directory; as a hub repo, {what} the hub cache ({constants.HF_HUB_CACHE}) "
                            f"and {why}: fetch it with `{fetch_command(repo, revision)}`") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{at}: no such directory; as a hub repo, it has no revision {revision}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{what}{repo}: no such directory, nor a hub repo you can read (private ones need "
                            "`hf auth login`)") from None
    except EntryNotFoundError:
        raise CheckpointError(f"{at}: the hub repo has no {name}") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{at}: cannot download it from the hub ({str(e).splitlines()[0]})") from None


def pretrained_weights_hint(timm_name: str) -> str:
    """Where a timm encoder's pretrained weights come from, and how to have them offline."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    repo = getattr(cfg, "hf_hub_id", None)
    local = "offline, give a local file with --encoder-weights, or encoder.weights in a preset"
    if not repo:
        return f"timm downloads its pretrained weights; {local}"
    return (f"timm downloads its pretrained weights from the hub repo {repo} (`{fetch_command(repo)}` puts them "
            f"in the hub cache, where offline runs find them); or, {local}")


# An encoder repo's weights, by preference: timm's, open_clip's, then a plain torch file.
WEIGHTS_FILES = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin")


def weights_file(repo: str, revision: str | None = None) -> str:
    """The weights file of a hub repo holding one vision encoder's weights (--encoder-weights REPO)."""
    folder = snapshot(repo, revision, patterns=list(WEIGHTS_FILES))
    found = [folder / name for name in WEIGHTS_FILES if (folder / name).is_file()]
    if not found:
        raise CheckpointError(f"{repo}: the hub repo (or its cached snapshot) holds none of {', '.join(WEIGHTS_FILES)}: "
                              f"fetch them with `{fetch_command(repo)}`, or give a local weights file")
    return str(found[0])
