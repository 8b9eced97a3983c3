"""SAEs for the feature analyses: everything ``ctx.saes`` loads, plus dictionary_learning checkpoints.

The seed's SAE adapter read ``dictionary_learning`` checkpoints (Marks et al.'s library: a folder
with ``ae.pt``, the module's state dict, and ``config.json``, whose ``trainer`` entry names the
``dict_class``). :func:`dictionary_learning_sae` turns one into the SAELens SAE of the same
computation, with the mapping SAELens uses for the ``dictionary_learning_1`` releases it hosts
(``sae_lens.loading.pretrained_sae_loaders``), read from local files with
``torch.load(weights_only=True)``:

- ``AutoEncoderTopK``: ``relu(encoder(x - b_dec))``, top ``k`` kept → SAELens ``topk`` with ``k``;
- ``AutoEncoder``: ``relu(encoder(x - bias))`` → ``standard``;
- ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: a learned threshold at inference → ``jumprelu``;
- ``JumpReluAutoEncoder``: ``jumprelu`` without subtracting ``b_dec`` first.

The hook is ``blocks.{trainer.layer}.hook_resid_post`` (what those releases read), unless
``config.json`` names one in ``hook_name``. ``sae: {path: dir}`` serves such a folder like a SAELens
directory (``runner.saes.loading``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runner.errors import ResourceError

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = ["DICT_CLASSES", "dictionary_learning_sae", "is_dictionary_learning_dir"]

DICT_CLASSES = {
    "AutoEncoderTopK": "topk",
    "AutoEncoder": "standard",
    "BatchTopKSAE": "jumprelu",
    "MatryoshkaBatchTopKSAE": "jumprelu",
    "JumpReluAutoEncoder": "jumprelu",
}
"""dictionary_learning classes read, and the SAELens architecture each becomes."""


def is_dictionary_learning_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a dictionary_learning checkpoint (``ae.pt`` and ``config.json``)."""
    return (directory / "ae.pt").is_file() and (directory / "config.json").is_file()


def _fail(path: Path, problem: str, fix: str) -> ResourceError:
    return ResourceError(f"{path}: {problem}\n{fix}")


def _read_config(directory: Path) -> tuple[dict[str, Any], str]:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        trainer = config["trainer"]
        dict_class = str(trainer["dict_class"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _fail(
            path,
            f"not a dictionary_learning config ({type(exc).__name__}: {exc}).",
            'It needs {"trainer": {"dict_class": ..., "activation_dim": ..., "dict_size": ..., '
            '"layer": ...}}.',
        ) from None
    if dict_class not in DICT_CLASSES:
        raise _fail(
            path,
            f"unknown dictionary_learning dict_class {dict_class!r}.",
            f"runner reads {', '.join(DICT_CLASSES)}; convert other SAEs to a SAELens directory "
            "(cfg.json + sae_weights.safetensors).",
        )
    return config, dict_class


def _state(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / "ae.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it, or a damaged file: say so, never run it
        raise _fail(
            path,
            f"cannot read it as a state dict of tensors ({type(exc).__name__}: {exc}).",
            "Save it with torch.save(ae.state_dict(), 'ae.pt').",
        ) from None
    if not isinstance(state, dict):
        raise _fail(path, f"holds a {type(state).__name__}, not a state dict.", "Save ae.state_dict().")
    return state


def _weights(state: dict[str, torch.Tensor], path: Path, dict_class: str) -> dict[str, torch.Tensor]:
    def pick(*names: str) -> torch.Tensor:
        for name in names:
            if name in state:
                return state[name]
        raise _fail(
            path,
            f"has no {' / '.join(names)} (a {dict_class} saves them); it has {', '.join(sorted(state))}.",
            "Check that config.json's dict_class matches the checkpoint.",
        )

    weights = {
        "W_enc": state["W_enc"] if "W_enc" in state else pick("encoder.weight").T,
        "W_dec": state["W_dec"] if "W_dec" in state else pick("decoder.weight").T,
        "b_enc": pick("b_enc", "encoder.bias"),
        "b_dec": pick("b_dec", "bias", "decoder_bias"),
    }
    if DICT_CLASSES[dict_class] == "jumprelu":
        threshold = pick("threshold")
        weights["threshold"] = threshold.expand(weights["W_enc"].shape[1]).clone()
    return {name: tensor.float().contiguous() for name, tensor in weights.items()}


def dictionary_learning_sae(directory: Path, device: str = "cpu", dtype: str = "float32") -> SAE[Any]:
    """The SAELens SAE computing what the dictionary_learning checkpoint in ``directory`` computes."""
    from sae_lens import SAE

    config, dict_class = _read_config(directory)
    trainer = config["trainer"]
    path = directory / "ae.pt"
    weights = _weights(_state(directory), path, dict_class)
    d_in, d_sae = weights["W_enc"].shape
    declared = (trainer.get("activation_dim", d_in), trainer.get("dict_size", d_sae))
    if declared != (d_in, d_sae):
        raise _fail(
            path,
            f"its encoder is {d_in} x {d_sae}, but config.json says activation_dim {declared[0]}, "
            f"dict_size {declared[1]}.",
            "Use the config.json saved with this checkpoint.",
        )
    hook = config.get("hook_name") or f"blocks.{trainer.get('layer', 0)}.hook_resid_post"
    cfg: dict[str, Any] = {
        "architecture": DICT_CLASSES[dict_class],
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": dtype,
        "device": device,
        "apply_b_dec_to_input": dict_class != "JumpReluAutoEncoder",
        "normalize_activations": "none",
        "metadata": {"hook_name": hook, "model_name": str(trainer.get("lm_name", "")).split("/")[-1] or None},
    }
    if dict_class == "AutoEncoderTopK":
        k = trainer.get("k")
        cfg["k"] = int(k if k is not None else state_k(directory))
    sae = SAE.from_dict(cfg)
    sae.load_state_dict({k: v.to(sae.W_enc.dtype) for k, v in weights.items()}, strict=True)
    return sae.to(device).eval()


def state_k(directory: Path) -> int:
    """``k`` of a TopK checkpoint whose config.json does not give it (dictionary_learning saves it too)."""
    state = _state(directory)
    if "k" not in state:
        raise _fail(directory / "config.json", "gives no trainer.k, and ae.pt has no k.", "Add trainer.k.")
    return int(state["k"])
