"""Which UNet (and text-encoder) layers an erasure trains, and the adapter files it writes.

Presets follow the ESD paper: `esd-x` trains cross-attention (prompt-specific erasure, for
styles), `esd-u` everything else but the time embedding and output layers (prompt-independent,
for nudity and objects). A selection that matches nothing is an error, never a silent no-op.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterError, TargetError, reason
from .provenance import (AdapterProvenance, BaseIdentity, base_identity, check_adapter, read_metadata,
                         require_provenance)

ADAPTER_NAME = "esd"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name: pipe.load_lora_weights(folder) finds it
CLASSIC_WEIGHTS_NAME = "esd_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # where diffusers reads the LoRA config (rank, alpha) from

PRESETS: dict[str, str] = {
    "esd-x": r".*attn2\.(to_q|to_k|to_v|to_out\.0)",
    "esd-x-strict": r".*attn2\.(to_k|to_v)",
    "esd-u": r"(?!.*attn2\.)(?!time_embedding\.)(?!add_embedding\.)(?!conv_out$).*",
    "esd-all": r".*",
}
TEXT_PRESETS: dict[str, str] = {  # CLIP text encoder layers (adapter.text_encoder)
    "attn": r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "mlp": r".*mlp\.(fc1|fc2)",
    "all": r".*(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
}
TRAINABLE_TYPES = (nn.Linear, nn.Conv2d)
TEXT_PREFIX = "text_encoder."  # diffusers' prefix of text-encoder LoRA keys
TOKEN_ROWS = "trainable_tokens_delta"  # PEFT's name of retrained token embedding rows (adapter.concept_tokens)


def select_modules(model: nn.Module, targets: str | list[str], presets: dict[str, str] = PRESETS,
                   key: str = "adapter.targets", what: str = "UNet") -> list[str]:
    """Full names of the Linear/Conv2d layers a preset, a regex (full match) or a list of names selects.

    List entries match a layer's full name or its dotted suffix (`attn2.to_k`).
    """
    names = [name for name, module in model.named_modules() if isinstance(module, TRAINABLE_TYPES)]
    if isinstance(targets, str):
        pattern = presets.get(targets, targets)
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise TargetError(f"{key}: {targets!r} is neither a preset ({', '.join(presets)}) "
                              f"nor a valid regex ({err})") from None
        chosen = [n for n in names if regex.fullmatch(n)]
        if not chosen:
            raise TargetError(f"{key}: {targets!r} selects no Linear or Conv2d layer of this {what}")
        return chosen
    chosen = []
    for entry in targets:
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        if not hits:
            raise TargetError(f"{key}: {entry!r} matches no Linear or Conv2d layer of this {what}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def select_text_modules(pipe, targets: str | list[str], concept_tokens: bool = False) -> list[str]:
    """The text encoder's layers `adapter.text_encoder` selects, or its input embedding for
    `adapter.concept_tokens` (none when neither is given); single-encoder models only."""
    if not targets and not concept_tokens:
        return []
    if getattr(pipe, "text_encoder_2", None) is not None:
        key = "adapter.concept_tokens" if concept_tokens else "adapter.text_encoder"
        raise TargetError(f"{key}: adapting the text encoder is supported for single-text-encoder "
                          "models (SD 1.x, 2.x); this model has two")
    if concept_tokens:
        return [embedding_name(pipe.text_encoder)]
    return select_modules(pipe.text_encoder, targets, TEXT_PRESETS, "adapter.text_encoder", "text encoder")


def concept_token_ids(tokenizer, concept) -> list[int]:
    """The token ids of the words that name the concept (`adapter.concept_tokens`): those of concept.prompts
    that no context, neutral or preserve prompt uses, so that training them changes no other prompt."""
    def ids(texts: list[str]) -> set[int]:
        return {i for t in texts for i in tokenizer(t, add_special_tokens=False).input_ids}

    others = [c.replace("{}", " ") for c in concept.contexts] + concept.erase_from + concept.trained().preserve
    own = sorted(ids(concept.prompts) - ids(others) - {tokenizer.unk_token_id})
    if not own:
        raise TargetError("adapter.concept_tokens: every word of concept.prompts is also in a context, neutral or "
                          "preserve prompt (or unknown to the tokenizer); no token names the concept alone")
    return own


def token_config(embedding: str, token_ids: list[int]):
    """A PEFT TrainableTokensConfig for these rows of the embedding layer named `embedding` (they start as the
    base's rows, so the adapter starts as the identity)."""
    from peft import TrainableTokensConfig

    return TrainableTokensConfig(target_modules=[embedding], token_indices=list(token_ids))


def embedding_name(text_encoder: nn.Module) -> str:
    """The full name of the text encoder's input token embedding: transformers versions nest it differently,
    and PEFT targets layers by name."""
    table = text_encoder.get_input_embeddings()
    return next(name for name, module in text_encoder.named_modules() if module is table)


def text_config(config: dict):
    """A text-encoder adapter config from its saved dict, of the PEFT method it names (LoRA layers, or trained
    token rows), so that one loader reads both."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING[config.get("peft_type", "LORA")](**config)


def lora_config(rank: int, alpha: float, dropout: float, init: str, modules: list[str]):
    """A PEFT LoraConfig whose B matrices start at zero, so the adapter starts as the identity."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=modules,
        init_lora_weights=True if init == "default" else "gaussian",
    )


def lora_state(model: nn.Module, prefix: str, inner: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """A model's adapter tensors and LoRA config, keyed as diffusers' LoRA files key them (`prefix`, then
    `inner` before each tensor name)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    config = model.peft_config[ADAPTER_NAME].to_dict()
    config = {f"{prefix}{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return {f"{prefix}{inner}{k}": v.detach().float().contiguous().cpu() for k, v in state.items()}, config


def save_lora(unet: nn.Module, path: str | Path, metadata: dict[str, str], text_encoder: nn.Module | None = None) -> None:
    """Write the adapter in diffusers' LoRA format (`unet.`-prefixed PEFT keys, config in the header), with the
    text encoder's adapter under `text_encoder.` when there is one. Text-encoder keys always say
    `text_model.` as CLIP's classic layout does (diffusers drops it for a transformers version whose CLIP
    has no such level), so that every reader finds them."""
    from .io import atomic_save_safetensors

    tensors, config = lora_state(unet, "unet.")
    if text_encoder is not None:
        inner = "" if hasattr(text_encoder, "text_model") else "text_model."
        te_tensors, te_config = lora_state(text_encoder, TEXT_PREFIX, inner)
        tensors.update(te_tensors)
        config.update(te_config)
    header = {"format": "pt", LORA_METADATA_KEY: json.dumps(config, sort_keys=True), **metadata}
    atomic_save_safetensors(tensors, path, metadata=header)


def adapter_file(path: str | Path) -> Path:
    """The weights file of an adapter given as a folder or a file."""
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_NAME, CLASSIC_WEIGHTS_NAME):
            if (path / name).is_file():
                return path / name
        raise AdapterError(f"adapter {path}: no {WEIGHTS_NAME} in this folder")
    if not path.is_file():
        raise AdapterError(f"adapter {path}: no such file or folder")
    if path.suffix != ".safetensors":
        raise AdapterError(f"adapter {path}: only .safetensors adapters are read")
    return path


def adapter_provenance(path: str | Path) -> AdapterProvenance:
    """The provenance record in an adapter's header (a folder or a file), after checking that it has one and
    that every tensor the header lists can be read, so a foreign or damaged file fails here, before any
    heavy work."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = adapter_file(path)
    record = AdapterProvenance.from_metadata(read_metadata(file), file)
    require_provenance(path, record)
    try:
        load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterError(f"adapter {file}: its tensors cannot be read ({reason(err)})") from None
    return record


def preserve_prompts(path: str | Path, record: AdapterProvenance) -> list[str]:
    """The preserve prompts an adapter was trained with: from its header (`record`, already read), or for
    adapters whose header predates that field, from the resolved recipe saved beside it."""
    from .recipe import load_recipe

    recipe = adapter_file(path).parent / "recipe.yaml"
    if record.preserve or not recipe.is_file():
        return record.preserve
    return load_recipe(recipe).concept.preserve


def add_text_adapter(text_encoder: nn.Module, config, name: str = ADAPTER_NAME) -> None:
    """PEFT LoRA layers (or trained token rows) in the text encoder, through PEFT itself (transformers' own
    adapter hooks ask for a newer PEFT than this stack runs); the config is kept where PEFT's state-dict
    helpers read it."""
    from peft import inject_adapter_in_model

    configs = text_encoder.__dict__.pop("peft_config", {})  # PEFT warns of a config it did not put there
    inject_adapter_in_model(config, text_encoder, adapter_name=name)
    text_encoder.peft_config = {**configs, name: config}


def _load_text_encoder_adapter(pipe, path: str | Path, file: Path, name: str) -> bool:
    """Load the adapter's text-encoder part, if it has one, under `name`; returns whether it had one."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    inner = "" if hasattr(pipe.text_encoder, "text_model") else "text_model."
    tensors = {k.removeprefix(TEXT_PREFIX).removeprefix(inner): v for k, v in load_file(str(file)).items()
               if k.startswith(TEXT_PREFIX)}
    if not tensors:
        return False
    if pipe.text_encoder is None or getattr(pipe, "text_encoder_2", None) is not None:
        raise AdapterError(f"adapter {path}: it adapts a text encoder; this model's text encoders do not fit it")
    config = {k.removeprefix(TEXT_PREFIX): v for k, v in json.loads(read_metadata(file)[LORA_METADATA_KEY]).items()
              if k.startswith(TEXT_PREFIX)}
    try:
        add_text_adapter(pipe.text_encoder, text_config(config), name)
    except (TypeError, ValueError, KeyError) as err:
        raise AdapterError(f"adapter {path}: its text-encoder adapter config does not fit this model ({reason(err)})") from None
    result = set_peft_model_state_dict(pipe.text_encoder, tensors, adapter_name=name)
    if result.unexpected_keys:
        raise AdapterError(f"adapter {path}: text-encoder tensors this model has no layer for "
                           f"({result.unexpected_keys[0]})")
    pipe.text_encoder.to(pipe.text_encoder.device, pipe.text_encoder.dtype)  # the LoRA layers where the encoder is
    return True


def load_adapters(pipe, paths: list[str | Path], weights: list[float] | None = None,
                  base: BaseIdentity | None = None) -> list[str]:
    """Load LoRA adapters into the pipeline's UNet (and text encoder, for those that adapt it) and activate
    them together, after checking that each was trained for this base (`base`, when the caller has hashed
    it already)."""
    if not paths:
        return []
    base = base or base_identity(pipe)
    weights = weights or [1.0] * len(paths)
    names, text, rows = [], [], {}
    for i, path in enumerate(paths):
        file = adapter_file(path)
        check_adapter(path, adapter_provenance(file), base)
        if file.name == CLASSIC_WEIGHTS_NAME:
            raise AdapterError(f"adapter {path}: classic ESD weights are not a LoRA adapter; merge them instead")
        name = f"erase_{i}"
        pipe.unet.load_lora_adapter(str(file.parent), weight_name=file.name, prefix="unet", adapter_name=name)
        names.append(name)
        if _load_text_encoder_adapter(pipe, path, file, name):
            text.append(i)
            _check_token_rows(pipe, name, path, weights[i], rows)
    pipe.unet.set_adapters(names, weights=weights)
    if text:
        _activate_text_adapters(pipe.text_encoder, [names[i] for i in text], [weights[i] for i in text])
    return names


def _check_token_rows(pipe, name: str, path: str | Path, weight: float, rows: dict[int, str | Path]) -> None:
    """Refuse what trained token rows cannot do: a weight (a row is replaced, not added to) and a token that two
    adapters both replace. `rows` collects the tokens taken so far and by which adapter."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in pipe.text_encoder.modules():
        if isinstance(module, TrainableTokensLayer) and name in module.token_indices:
            if weight != 1:
                raise AdapterError(f"adapter {path}: it replaces token embeddings (adapter.concept_tokens), which "
                                   f"cannot be weighted; give it weight 1, not {weight:g}")
            for token in module.token_indices[name]:
                if token in rows:
                    word = pipe.tokenizer.convert_ids_to_tokens(token)
                    raise AdapterError(f"adapter {path}: it retrains the embedding of {word!r}, which adapter "
                                       f"{rows[token]} retrains too; erasures of the same words cannot be stacked")
                rows[token] = path


def _activate_text_adapters(text_encoder: nn.Module, names: list[str], weights: list[float]) -> None:
    """Activate the adapters on each adapted layer of the text encoder, each LoRA at its weight (diffusers'
    `set_weights_and_activate_adapters` assumes LoRA layers only; trained token rows have no scale)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in text_encoder.modules():
        if isinstance(module, BaseTunerLayer):
            own = [n for n in names if n in _held(module)]
            module.set_adapter(own, inference_mode=True)  # loaded to draw with, not to train
            for n, w in zip(names, weights):
                if n in own and hasattr(module, "set_scale"):
                    module.set_scale(n, w)


def _held(layer) -> set[str]:
    """The adapters a PEFT layer holds weights of (LoRA matrices, or token rows): a layer handed the name of
    an adapter it does not hold fails (token rows) where it should ignore it."""
    return {n for attr in layer.adapter_layer_names for n in getattr(layer, attr)}


def fuse_text_encoder_adapters(pipe, names: list[str]) -> None:
    """Fold the loaded adapters that adapt the text encoder into its weights and drop its LoRA layers (and
    trained token rows). Each layer merges the adapters it holds, so LoRA layers and token rows of different
    adapters fold together (diffusers' `fuse_text_encoder_lora` hands every layer every name)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    text = [n for n in names if n in getattr(pipe.text_encoder, "peft_config", {})]
    if text:
        for module in pipe.text_encoder.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=[n for n in text if n in _held(module)])
        recurse_remove_peft_layers(pipe.text_encoder)
        del pipe.text_encoder.peft_config


def fuse_loaded(pipe, names: list[str]) -> None:
    """Fold loaded adapters into the UNet's and the text encoder's weights and drop the LoRA layers."""
    pipe.unet.fuse_lora(adapter_names=names)
    pipe.unet.unload_lora()
    fuse_text_encoder_adapters(pipe, names)
