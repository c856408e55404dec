"""Where adapters come from and go to, besides a local directory: the Hugging Face Hub, and the model card.

* :func:`resolve_adapter_dir` -- the local directory of an adapter given as HF PEFT's ``model_id``: a local
  directory (``subfolder`` joined), or a Hub repository whose ``adapter_config.json`` and weights are
  downloaded with ``huggingface_hub.hf_hub_download`` (``revision``, ``cache_dir``, ``token``, ... passed on).
* :func:`push_adapter` -- ``PeftModel.push_to_hub``: the adapter directory that ``save_pretrained`` writes
  (config, weights, model card) is uploaded, and nothing else: never the base model's weights.
* :func:`write_model_card` -- ``README.md`` with the Hub metadata HF PEFT writes (``library_name: peft``,
  ``base_model``, tags).

``huggingface_hub`` (installed with transformers) is imported only inside these functions; without it, or
without a network, they raise one clear error and upload nothing.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

from .checkpoint import PICKLE_NAME, SAFETENSORS_NAME
from .fileio import atomic_write_text

CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"

#: keyword arguments of ``from_pretrained`` / ``load_adapter`` that go to ``hf_hub_download`` (HF PEFT's set)
HUB_KWARGS = ("revision", "cache_dir", "token", "use_auth_token", "local_files_only", "force_download",
              "user_agent")


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("loading from or pushing to the Hugging Face Hub needs huggingface_hub "
                          "(pip install huggingface_hub; transformers installs it)") from None
    return huggingface_hub


def _missing_in_repo():
    """huggingface_hub's error for a file that the repository does not have (not: offline / no network)."""
    import huggingface_hub.errors as errors
    return getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)


def resolve_adapter_dir(model_id, subfolder: Optional[str] = None, allow_pickle: bool = False,
                        **hub_kwargs) -> str:
    """The local directory holding ``adapter_config.json`` (and the weights) of ``model_id``.

    A local directory: ``model_id/subfolder`` (``revision`` names a version of a Hub repository and cannot
    select one of a local directory: ValueError).  Anything else is a Hub repository id: the config and the
    weights (``adapter_model.safetensors``; ``adapter_model.bin`` only with ``allow_pickle``) are downloaded
    into the Hugging Face cache and their directory returned; a failed download is an OSError naming the
    repository."""
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown} (Hub download options: {list(HUB_KWARGS)})")
    model_id = os.fspath(model_id)
    if subfolder is not None and (not isinstance(subfolder, str) or os.path.isabs(subfolder)
                                  or ".." in subfolder.replace("\\", "/").split("/")):
        raise ValueError(f"subfolder: expected a relative path inside {model_id!r}, got {subfolder!r}")
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(model_id) or os.path.isfile(model_id):
        if hub_kwargs.get("revision") is not None:
            raise ValueError(f"revision={hub_kwargs['revision']!r}: {model_id!r} is a local directory; revision "
                             "selects a version of a Hugging Face Hub repository")
        if not os.path.exists(local):
            raise FileNotFoundError(f"subfolder: {local!r} does not exist")
        return local
    if model_id.count("/") > 1 or model_id.startswith((".", "/", "~")) or "\\" in model_id:
        raise FileNotFoundError(f"adapter: no directory {model_id!r} (and it is not a Hub repository id)")
    hub = _hub()
    if "use_auth_token" in hub_kwargs:
        hub_kwargs["token"] = hub_kwargs.pop("use_auth_token")

    def fetch(name):
        try:
            return hub.hf_hub_download(model_id, name, subfolder=subfolder, **hub_kwargs)
        except _missing_in_repo():
            return None
        except Exception as e:  # network, authentication, missing repository, offline mode
            raise OSError(f"adapter {model_id!r}: not a local directory, and downloading {name} from the Hugging "
                          f"Face Hub failed: {type(e).__name__}: {e}") from e

    cfg = fetch(CONFIG_NAME)
    if cfg is None:
        raise FileNotFoundError(f"adapter {model_id!r}: the Hub repository has no {CONFIG_NAME}")
    if fetch(SAFETENSORS_NAME) is None:
        if not allow_pickle:
            raise FileNotFoundError(f"adapter {model_id!r}: no {SAFETENSORS_NAME} in the repository (a pickle "
                                    f"{PICKLE_NAME} is loaded only with allow_pickle=True)")
        if fetch(PICKLE_NAME) is None:
            raise FileNotFoundError(f"adapter {model_id!r}: no adapter weights in the repository")
    return os.path.dirname(cfg)


def push_adapter(peft_model, repo_id: str, *, commit_message: Optional[str] = None, private: Optional[bool] = None,
                 token=None, revision: Optional[str] = None, create_pr: bool = False,
                 commit_description: Optional[str] = None, safe_serialization: bool = True,
                 selected_adapters=None, save_embedding_layers="auto", tags=None):
    """Save ``peft_model``'s adapter(s) into a temporary directory and upload that directory to ``repo_id``.

    What is uploaded is exactly what ``save_pretrained`` writes: adapter config, adapter weights, model card.
    Returns huggingface_hub's commit info."""
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id: expected a Hub repository id such as 'user/my-adapter', got {repo_id!r}")
    hub = _hub()
    with tempfile.TemporaryDirectory(prefix="fastpeft-push-") as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=safe_serialization, selected_adapters=selected_adapters,
                                   save_embedding_layers=save_embedding_layers)
        if tags:  # HF's push_to_hub(tags=...): the card's tags (the temporary directory's card is ours)
            cfg = peft_model.active_peft_config
            atomic_write_text(os.path.join(tmp, CARD_NAME), model_card(
                cfg.base_model_name_or_path, peft_model._tuner.peft_type, tags=list(tags)))
        try:
            api = hub.HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True, token=token)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message or
                                     "Upload adapter (fastpeft)", commit_description=commit_description,
                                     revision=revision, create_pr=create_pr, token=token)
        except Exception as e:
            raise OSError(f"push_to_hub({repo_id!r}): the upload to the Hugging Face Hub failed, nothing was "
                          f"uploaded by fastpeft ({type(e).__name__}: {e}); save_pretrained(directory) writes the "
                          "same files for a later upload") from e


def model_card(base_model: Optional[str], peft_type: str, tags=(), pipeline_tag: Optional[str] = None) -> str:
    """A model card (``README.md``) with the Hub metadata HF PEFT writes."""
    lines = ["---", "library_name: peft"]
    if base_model:
        lines.append(f"base_model: {_yaml_str(base_model)}")
    if pipeline_tag:
        lines.append(f"pipeline_tag: {pipeline_tag}")
    all_tags = sorted({*tags, str(peft_type).lower(), "fastpeft", *( [f"base_model:adapter:{base_model}"]
                                                                     if base_model else [])})
    lines.append("tags:")
    lines += [f"- {_yaml_str(t)}" for t in all_tags]
    lines.append("---")
    from ._version import __version__
    body = [
        "",
        f"# {peft_type} adapter" + (f" for {base_model}" if base_model else ""),
        "",
        "A parameter-efficient fine-tuning adapter in the Hugging Face PEFT format (`adapter_config.json`, "
        "`adapter_model.safetensors`), written by fastpeft. Load it with "
        "`peft.PeftModel.from_pretrained(base_model, path)` or `fastpeft.PeftModel.from_pretrained(base_model, path)`.",
        "",
        "### Framework versions",
        "",
        f"- fastpeft {__version__}",
    ]
    return "\n".join(lines + body) + "\n"


def write_model_card(directory: str, text: str) -> None:
    """Write ``README.md`` unless the directory already has one (a card the user wrote is kept)."""
    path = os.path.join(directory, CARD_NAME)
    if not os.path.exists(path):
        atomic_write_text(path, text)


def _yaml_str(s: str) -> str:
    s = str(s)
    if s and all(c.isalnum() or c in "-_./:" for c in s) and not s[0] in "-:.":
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = ["resolve_adapter_dir", "push_adapter", "model_card", "write_model_card", "HUB_KWARGS"]
