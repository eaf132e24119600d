"""The persona-vector file format: one safetensors file, JSON metadata in its header.

Tensors: ``vectors`` ``(num_layers, hidden_size)`` float32, the per-layer mean difference
(trait-positive minus trait-negative), plus ``pos_mean`` and ``neg_mean`` of the same shape.
Metadata: the safetensors header entry ``persona_guard`` holds the JSON of :class:`VectorMetadata`.
Nothing is ever pickled, so loading a vector file from a stranger is safe.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import VectorFileError, VectorMismatchError
from .layers import LAYER_CONVENTION, LayerError, hidden_size, num_hidden_layers, unwrap_model
from .models import model_name, weights_fingerprint

FORMAT = "persona-guard/vector"
FORMAT_VERSION = 1
_HEADER_KEY = "persona_guard"




def save_tensors_atomically(tensors: dict, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file next to ``path`` and rename it into place, so an interrupted
    save never leaves a half-written file where a good one was (``select-layer`` rewrites
    vector files in place).

    Args:
        tensors: name -> tensor. path: the file to write. metadata: the safetensors header strings.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@dataclass(frozen=True)
class ModelIdentity:
    """What a vector (or steering spec) records about the model it came from, and the one check
    that it fits another model: hidden size, layer count, architecture and layer convention
    always; the weights fingerprint (:func:`guard.core.models.weights_fingerprint`) unless
    other weights are allowed."""

    model_name: str
    model_fingerprint: str
    model_type: str
    hidden_size: int
    num_layers: int
    layer_convention: str = LAYER_CONVENTION

    @classmethod
    def of(cls, model) -> "ModelIdentity":
        """The identity of a loaded model."""
        core = unwrap_model(model)
        return cls(model_name(core), weights_fingerprint(core), str(getattr(core.config, "model_type", "")),
                   hidden_size(core), num_hidden_layers(core))

    @classmethod
    def from_dict(cls, data: dict) -> "ModelIdentity":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, model, what: str, *, allow_other_weights: bool = False) -> None:
        """Raise :class:`VectorMismatchError` naming each field that differs.

        Args:
            model: the model about to be used.
            what: how the message names the artifact, e.g. "the 'evil' vector".
            allow_other_weights: skip the weights fingerprint (same architecture, other weights).
        """
        other = ModelIdentity.of(model)
        problems = []
        if other.hidden_size != self.hidden_size:
            problems.append(f"hidden size: vector {self.hidden_size}, model {other.hidden_size}")
        if other.num_layers != self.num_layers:
            problems.append(f"number of layers: vector {self.num_layers}, model {other.num_layers}")
        if self.model_type and other.model_type and other.model_type != self.model_type:
            problems.append(f"architecture: vector {self.model_type}, model {other.model_type}")
        if self.layer_convention != LAYER_CONVENTION:
            problems.append(f"layer convention: vector {self.layer_convention!r}, this version uses {LAYER_CONVENTION!r}")
        source = (f"{self.model_name}" if self.model_name != other.model_name
                  else f"{self.model_name} (a model of that name with other weights or shape)")
        if problems:
            raise VectorMismatchError(f"{what} was extracted from {source} and does not fit {other.model_name}: "
                                      + "; ".join(problems))
        if other.model_fingerprint != self.model_fingerprint and not allow_other_weights:
            raise VectorMismatchError(
                f"{what} was extracted from {self.model_name} (weights fingerprint {self.model_fingerprint}) but the "
                f"model {other.model_name} has different weights (fingerprint {other.model_fingerprint}); if it is a "
                "finetune of that model, allow it (allow_other_weights=True, CLI --allow-other-weights)")


@dataclass
class VectorMetadata:
    trait: str
    model_name: str
    model_fingerprint: str
    model_type: str
    hidden_size: int
    num_layers: int
    layer_convention: str = LAYER_CONVENTION
    positions: str = "response_mean"
    extraction: dict = field(default_factory=dict)  # sampling settings, judge, seed, trait fingerprint
    counts: dict = field(default_factory=dict)  # samples generated / kept per polarity
    norms: list = field(default_factory=list)  # ||v_layer|| for every layer
    layer_stats: dict = field(default_factory=dict)  # per-layer diagnostics, e.g. effect_size
    recommended_layer: int | None = None
    package_version: str = ""
    created_at: str = ""
    extra: dict = field(default_factory=dict)  # keys written by newer versions, kept on round trip

    @classmethod
    def from_dict(cls, data: dict) -> "VectorMetadata":
        """Metadata from a vector file's header, checked field by field.

        Args:
            data: the header's JSON object (``format`` keys already removed). Unknown keys are
                kept in ``extra``.

        Raises :class:`VectorFileError` naming the first missing field, the first field of the
        wrong type, or a recommended layer outside ``0..num_layers-1``.
        """
        if not isinstance(data, dict):
            raise VectorFileError(f"the metadata is a JSON {type(data).__name__}, not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise VectorFileError(f"the metadata lacks {', '.join(missing)}")
        for name, expected in _FIELD_TYPES.items():
            if name in data and not _is_type(data[name], expected):
                raise VectorFileError(f"metadata field {name!r} should be {_type_names(expected)}, "
                                      f"got {_short(data[name])}")
        for name in ("hidden_size", "num_layers"):
            if data[name] < 1:
                raise VectorFileError(f"metadata field {name!r} is {data[name]}, it must be at least 1")
        if not data["trait"].strip():
            raise VectorFileError("metadata field 'trait' is empty")
        layer = data.get("recommended_layer")
        if layer is not None and not 0 <= layer < data["num_layers"]:
            raise VectorFileError(f"recommended_layer {layer} is out of range for a vector of {data['num_layers']} "
                                  f"layers (0-{data['num_layers'] - 1})")
        norms = data.get("norms", [])
        if not all(_is_type(n, (int, float)) for n in norms):
            raise VectorFileError("metadata field 'norms' should be a list of numbers")
        effect = data.get("layer_stats", {}).get("effect_size")
        if effect is not None and not (isinstance(effect, list)
                                       and all(_is_type(e, (int, float)) for e in effect)):
            raise VectorFileError("metadata field layer_stats.effect_size should be a list of numbers")
        selection = data.get("layer_stats", {}).get("selection")
        if selection is not None and not _valid_selection(selection):
            raise VectorFileError("metadata field layer_stats.selection is malformed (expected coeff, "
                                  "max_coherence_drop, gated and per-layer effect and coherence_drop numbers)")
        known = {k: v for k, v in data.items() if k in names and k != "extra"}
        extra = {**data.get("extra", {}), **{k: v for k, v in data.items() if k not in names}}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELD_TYPES = {
    "trait": str, "model_name": str, "model_fingerprint": str, "model_type": str, "hidden_size": int,
    "num_layers": int, "layer_convention": str, "positions": str, "extraction": dict, "counts": dict, "norms": list,
    "layer_stats": dict, "recommended_layer": (int, type(None)), "package_version": str, "created_at": str,
    "extra": dict,
}


def _is_type(value, expected) -> bool:
    """isinstance, except that a bool is not an int here (JSON true is not a layer count)."""
    expected = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):
        return bool in expected
    return isinstance(value, expected)


def _type_names(expected) -> str:
    names = {str: "a string", int: "an integer", float: "a number", dict: "an object", list: "a list",
             type(None): "null"}
    expected = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(names.get(t, t.__name__) for t in expected)


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return (text if len(text) <= 40 else text[:39] + "…") + f" ({type(value).__name__})"


def _valid_selection(selection) -> bool:
    number = (int, float)
    return (isinstance(selection, dict) and _is_type(selection.get("coeff"), number)
            and _is_type(selection.get("max_coherence_drop"), number) and isinstance(selection.get("gated"), bool)
            and all(isinstance(selection.get(key, {}), dict)
                    and all(_is_type(v, number) for v in selection.get(key, {}).values())
                    for key in ("effect", "coherence_drop")))


def _check_finite(tensors: dict, path: Path, num_layers: int) -> None:
    """Refuse tensors holding NaN or infinity: every projection, z-score and steering step would be NaN."""
    for name in ("vectors", "pos_mean", "neg_mean"):
        tensor = tensors.get(name)
        if tensor is None or not tensor.is_floating_point():
            continue
        bad = ~torch.isfinite(tensor)
        if bad.any():
            rows = (bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
                    if tensor.ndim >= 2 and tensor.shape[0] == num_layers else [])
            where = f" at layer(s) {', '.join(map(str, rows[:8]))}{', ...' if len(rows) > 8 else ''}" if rows else ""
            raise VectorFileError(f"{path}: the '{name}' tensor holds NaN or infinite values{where}, so nothing "
                                  "read along it would mean anything; extract the vector again (in float32: "
                                  "--dtype float32)")


@dataclass
class PersonaVector:
    """Per-layer persona vectors for one trait of one model."""

    vectors: torch.Tensor
    meta: VectorMetadata
    pos_mean: torch.Tensor | None = None
    neg_mean: torch.Tensor | None = None
    # Weights fingerprints of the models this vector was checked against (see check_model).
    _accepted: set = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self):
        self.vectors = self.vectors.detach().to("cpu", torch.float32).contiguous()
        if self.vectors.ndim != 2:
            raise VectorFileError(f"vectors must be (num_layers, hidden_size), got {tuple(self.vectors.shape)}")
        if tuple(self.vectors.shape) != (self.meta.num_layers, self.meta.hidden_size):
            raise VectorFileError(
                f"vectors have shape {tuple(self.vectors.shape)} but metadata says "
                f"({self.meta.num_layers}, {self.meta.hidden_size})")
        for name in ("pos_mean", "neg_mean"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.detach().to("cpu", torch.float32).contiguous())
        if not self.meta.norms:
            self.meta.norms = self.norms().tolist()

    # -- access ---------------------------------------------------------------------------
    @property
    def trait(self) -> str:
        return self.meta.trait

    @property
    def num_layers(self) -> int:
        return self.meta.num_layers

    @property
    def hidden_size(self) -> int:
        return self.meta.hidden_size

    def layer(self, layer: int) -> torch.Tensor:
        """The raw vector at ``layer`` (block-output convention; negative counts from the end)."""
        return self.vectors[layer]

    def default_layer(self) -> int:
        """The layer every command uses unless told otherwise: the recommended one from layer selection."""
        if self.meta.recommended_layer is None:
            raise VectorFileError(
                f"the {self.trait} vector has no recommended layer yet; pass a layer explicitly, or run "
                "`persona-guard select-layer` on the file to choose one by steering effect")
        return self.meta.recommended_layer

    def resolve_layer(self, layer: int | None = None) -> int:
        """``layer`` as an index in 0..num_layers-1 (negative counts from the end; None: the
        recommended layer). Out of range raises :class:`~guard.core.layers.LayerError`."""
        if layer is None:
            return self.default_layer()
        if not -self.num_layers <= layer < self.num_layers:
            raise LayerError(f"layer {layer} is out of range for the {self.trait} vector ({self.num_layers} layers)")
        return layer % self.num_layers

    def unit(self, layer: int) -> torch.Tensor:
        """The vector at ``layer`` scaled to unit norm.

        Args:
            layer: the layer index (negative counts from the end).
        """
        vec = self.vectors[layer]
        return vec / vec.norm().clamp_min(1e-12)

    def norms(self) -> torch.Tensor:
        return self.vectors.norm(dim=-1)

    def cosine(self, other: "PersonaVector") -> torch.Tensor:
        """Per-layer cosine similarity with another vector of the same model."""
        if self.vectors.shape != other.vectors.shape:
            raise VectorMismatchError(
                f"cannot compare vectors of shape {tuple(self.vectors.shape)} and {tuple(other.vectors.shape)}")
        return torch.nn.functional.cosine_similarity(self.vectors, other.vectors, dim=-1)

    # -- compatibility --------------------------------------------------------------------
    def check_model(self, model, *, allow_other_weights: bool = False) -> None:
        """Refuse a model this vector was not extracted from (see :meth:`ModelIdentity.check`).
        A model that passes is remembered, so features handed this vector later
        (:meth:`ensure_fits`) do not check it again with other rules.

        Args:
            model: the model the vector is about to be used with.
            allow_other_weights: accept other weights of the same architecture (a finetune of
                the extraction model, say); hidden size, layer count and architecture must match.
        """
        ModelIdentity.from_dict(self.meta.to_dict()).check(model, f"the {self.meta.trait!r} vector",
                                                           allow_other_weights=allow_other_weights)
        self._accepted.add(weights_fingerprint(unwrap_model(model)))

    def ensure_fits(self, model) -> None:
        """What library classes call: nothing if this vector was already checked against this
        model (at load, with whatever ``allow_other_weights`` the user chose); otherwise the
        strict check of :meth:`check_model`."""
        if weights_fingerprint(unwrap_model(model)) not in self._accepted:
            self.check_model(model)

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the vectors, the class means if present, and the metadata to a safetensors file,
        atomically; returns the path written.

        Args:
            path: the file to write (missing parent folders are created).
        """
        path = Path(path)
        tensors = {"vectors": self.vectors}
        if self.pos_mean is not None:
            tensors["pos_mean"] = self.pos_mean
        if self.neg_mean is not None:
            tensors["neg_mean"] = self.neg_mean
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.meta.to_dict()}
        return save_tensors_atomically(tensors, path, {_HEADER_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path, model=None, *, allow_other_weights: bool = False) -> "PersonaVector":
        """Read a vector file; given ``model``, also refuse it unless it belongs to that model
        (see :meth:`check_model`).

        Args:
            path: the vector file.
            model: the model the vector will be used with (None: no check).
            allow_other_weights: with ``model``, accept other weights of the same architecture
                (see :meth:`check_model`).
        """
        vector = cls._read(Path(path))
        if model is not None:
            vector.check_model(model, allow_other_weights=allow_other_weights)
        return vector

    @classmethod
    def _read(cls, path: Path) -> "PersonaVector":
        if not path.is_file():
            raise VectorFileError(f"vector file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = (f.metadata() or {}).get(_HEADER_KEY)
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise VectorFileError(f"{path} is not a safetensors file: {exc}") from exc
        if header is None:
            raise VectorFileError(f"{path} is a safetensors file but not a persona-guard vector (no metadata)")
        damaged = "the file is damaged or was edited by hand; extract the vector again"
        try:
            data = json.loads(header)
        except json.JSONDecodeError as exc:
            raise VectorFileError(f"{path}: its persona-guard metadata is not valid JSON ({exc.msg} at character "
                                  f"{exc.pos}); {damaged}") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise VectorFileError(f"{path} is not a persona-guard vector file")
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise VectorFileError(f"{path} uses vector format version {version}; this persona-guard reads {FORMAT_VERSION}")
        if "vectors" not in tensors:
            raise VectorFileError(f"{path} has no 'vectors' tensor")
        try:
            meta = VectorMetadata.from_dict(data)
        except VectorFileError as exc:
            raise VectorFileError(f"{path}: {exc}; {damaged}") from None
        shape = (meta.num_layers, meta.hidden_size)
        for name in ("pos_mean", "neg_mean"):
            if name in tensors and tuple(tensors[name].shape) != tuple(tensors["vectors"].shape):
                raise VectorFileError(f"{path}: the '{name}' tensor has shape {tuple(tensors[name].shape)}, the "
                                      f"vectors {tuple(tensors['vectors'].shape)}; {damaged}")
        if tuple(tensors["vectors"].shape) != shape:
            raise VectorFileError(f"{path}: the vectors have shape {tuple(tensors['vectors'].shape)} but the metadata "
                                  f"says {shape}; {damaged}")
        _check_finite(tensors, path, meta.num_layers)
        return cls(tensors["vectors"], meta, tensors.get("pos_mean"), tensors.get("neg_mean"))


def metadata_for(model, trait: str, **fields) -> VectorMetadata:
    """Metadata describing ``model``, ready for a new :class:`PersonaVector`.

    Args:
        model: the model the vector comes from (PEFT and DDP wrappers are looked through).
        trait: the trait's name.
        fields: further :class:`VectorMetadata` fields (``extraction``, ``counts``, ...).
    """
    from .. import __version__

    core = unwrap_model(model)
    return VectorMetadata(
        trait=trait,
        model_name=model_name(core),
        model_fingerprint=weights_fingerprint(core),
        model_type=str(getattr(core.config, "model_type", "")),
        hidden_size=hidden_size(core),
        num_layers=num_hidden_layers(core),
        package_version=__version__,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    )
