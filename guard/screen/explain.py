"""Why a sample is flagged: each response token's projection on the persona vector, as an HTML report.

For a sample (x, y), unit persona vector v̂ at layer ℓ and response token t, the reading is
``h_ℓ(x, y)[t]·v̂ − r``, where the reference ``r`` is

* ``last_prompt``: the sample's last-prompt-token projection ``h_ℓ(x)[-1]·v̂`` (approx mode);
  the mean of the readings over the response is then the approx score;
* ``base``: the mean projection of the base model's own response to the same prompt (full
  mode); the mean of the readings is then ΔP;
* ``none``: zero (raw projections).

Tokens are tokenised exactly as the :class:`~guard.screen.scoring.Screener` does (chat-templated
prompt, the response on its own, the same window), so the readings average to the screen's
score. :func:`write_html` renders them as a self-contained page: inline CSS, no scripts, images
linked relatively.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import torch

from ..core.forward import encode_chat, forward_until, pad_batch, plan_batches
from ..core.layers import capture
from ..core.models import eval_mode
from ..core.vectors import PersonaVector
from ..errors import ScreenError
from .samples import Sample
from .scoring import ScreenResult, fit_window

REFERENCES = ("last_prompt", "base", "none")
REFERENCE_TEXT = {
    "last_prompt": "minus the projection of the sample's last prompt token (the position right before the reply); "
                   "their mean over the response is the approx score",
    "base": "minus the mean projection of the model's own (base) response to the same prompt; "
            "their mean over the response is ΔP",
    "none": "(raw projections, nothing subtracted)",
}
ALONG, AGAINST = (220, 38, 38), (37, 99, 235)  # red pushes along the vector, blue against it


@dataclass
class TokenReading:
    """One sample's per-token reading along one direction.

    ``tokens[i]`` is the text of response token i (with the whitespace before it, so the tokens
    join to the response); ``values[i]`` its projection minus ``reference``.
    """

    id: str
    index: int
    tokens: list[str]
    values: list[float]
    reference: float
    reference_kind: str
    truncated: bool = False

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)


def response_pieces(tokenizer, text: str) -> tuple[list[int], list[str]]:
    """Token ids of a response (as the screen tokenises it) and each token's text.

    With a fast tokenizer each piece is the text from the previous token's end to this token's
    end (offsets), so pieces join to ``text`` exactly; a token inside a multi-byte character
    another token already covers gets an empty piece. Slow tokenizers decode growing prefixes.

    Args:
        tokenizer: the model's tokenizer.
        text: the response.
    """
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # slow tokenizers have no offsets
        enc = None
    if enc is not None and "offset_mapping" in enc:
        ids, pieces, done = list(enc["input_ids"]), [], 0
        for _, end in enc["offset_mapping"]:
            pieces.append(text[done:end] if end > done else "")
            done = max(done, end)
        if pieces:
            pieces[-1] += text[done:]  # anything after the last offset (never lost)
        return ids, pieces
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, shown = [], ""
    for i in range(len(ids)):
        decoded = tokenizer.decode(ids[:i + 1])
        if decoded.endswith("\ufffd"):  # an incomplete character: shown with the token that completes it
            pieces.append("")
            continue
        pieces.append(decoded[len(shown):] if decoded.startswith(shown) else tokenizer.decode(ids[i:i + 1]))
        shown = decoded
    return ids, pieces


def _unit(direction, layer: int) -> torch.Tensor:
    if isinstance(direction, PersonaVector):
        return direction.unit(layer).float()
    vec = torch.as_tensor(direction).float()
    if vec.dim() != 1:
        raise ScreenError(f"a direction is one vector of the hidden size, got shape {tuple(vec.shape)}")
    return vec / vec.norm().clamp_min(1e-12)


@torch.inference_mode()
def token_readings(model, tokenizer, samples: Sequence[Sample], direction: PersonaVector | torch.Tensor, layer: int,
                   *, reference: str = "last_prompt", base_projections: Sequence[float] | None = None,
                   max_length: int | None = None, batch_size: int = 8,
                   layer_path: str | None = None) -> list[TokenReading]:
    """Per-token projections of each sample's response on a unit direction at ``layer``, minus a reference.

    Right-padded batches (planned by length), each forward stopped after ``layer``.

    Args:
        model, tokenizer: the screened model.
        samples: the samples to read (each with a non-empty prompt and response).
        direction: a :class:`PersonaVector` (its unit vector at ``layer``) or a ``(hidden,)``
            tensor (normalised here).
        layer: the layer read (block output, as everywhere in persona-guard).
        reference: ``"last_prompt"``, ``"base"`` or ``"none"`` (see the module docstring).
        base_projections: with ``reference="base"``, each sample's base-response mean projection
            (``SampleScore.scores[name]["base_projection"]`` of a full-mode screen).
        max_length: the prompt + response window (default: the model's context length), as
            the screen's ``ScreenConfig.max_length``.
        batch_size: rows per forward.
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    if reference not in REFERENCES:
        raise ScreenError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    if reference == "base" and (base_projections is None or len(base_projections) != len(samples)):
        raise ScreenError("reference 'base' needs one base-response projection per sample (a full-mode screen)")
    window = int(max_length or getattr(getattr(model, "config", None), "max_position_embeddings", None) or 4096)
    prompts = encode_chat(tokenizer, [s.prompt for s in samples])
    responses, pieces, cut = [], [], []
    for i, sample in enumerate(samples):
        ids, text = response_pieces(tokenizer, sample.response)
        if not ids or not prompts[i]:
            raise ScreenError(f"sample {sample.id} has an empty {'response' if not ids else 'prompt'}; nothing to read")
        prompts[i], ids, truncated = fit_window(prompts[i], ids, window)
        responses.append(ids)
        pieces.append(text[:len(ids)])
        cut.append(truncated)
    unit = _unit(direction, layer)
    device = next(model.parameters()).device
    out: list[TokenReading | None] = [None] * len(samples)
    with eval_mode(model):
        for batch in plan_batches([len(p) + len(r) for p, r in zip(prompts, responses)], batch_size):
            ids, attn = pad_batch([prompts[i] + responses[i] for i in batch], 0, device, side="right")
            with capture(model, [layer], position="all", layer_path=layer_path) as acts:
                forward_until(model, ids, attn, layer, layer_path)
            projections = (acts[layer] @ unit.to(acts[layer].device)).cpu()  # (rows, seq)
            for row, i in enumerate(batch):
                start, end = len(prompts[i]), len(prompts[i]) + len(responses[i])
                if reference == "last_prompt":
                    ref = float(projections[row, start - 1])
                else:
                    ref = float(base_projections[i]) if reference == "base" else 0.0
                values = (projections[row, start:end] - ref).tolist()
                out[i] = TokenReading(samples[i].id, samples[i].index, pieces[i], values, ref, reference, cut[i])
    return out


# -- HTML ---------------------------------------------------------------------------------------

@dataclass
class ExplainedSample:
    """A reading with what the report shows beside it."""

    reading: TokenReading
    rank: int                      # rank by this key's score, 1 = highest
    score: float | None
    z: float | None
    over_threshold: bool
    prompt: str                    # the last user turn


@dataclass
class Section:
    """The explained samples of one screened key (a trait at a layer)."""

    name: str
    layer: int
    score_label: str               # "approx ΔP" or "ΔP"
    samples: list[ExplainedSample]


def colour_scale(values: Sequence[float]) -> float:
    """The |value| at which shading saturates: the 98th percentile of |values| (one extreme
    token must not wash every other one out)."""
    mags = sorted(abs(v) for v in values if math.isfinite(v))
    if not mags:
        return 1.0
    return max(mags[min(len(mags) - 1, int(0.98 * len(mags)))], 1e-6)


def _shade(value: float, scale: float) -> str:
    r, g, b = ALONG if value >= 0 else AGAINST
    alpha = 0.85 * min(1.0, abs(value) / scale)  # capped so dark text stays readable
    return f"rgba({r},{g},{b},{alpha:.2f})"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def _trim(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1f2328;max-width:1150px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #d0d7de}
.meta,.note,.ref{color:#57606a;margin:4px 0}
.legend{display:flex;align-items:center;gap:8px;margin:8px 0 12px;font-size:13px}
.bar{width:260px;height:14px;border:1px solid #d0d7de;
     background:linear-gradient(90deg,rgba(37,99,235,.85),#fff,rgba(220,38,38,.85))}
.charts{display:flex;flex-wrap:wrap;gap:12px} .charts figure{margin:0} .charts img{width:360px;border:1px solid #d0d7de}
.charts figcaption{font-size:12px;color:#57606a}
.sample{border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;margin:10px 0}
.head{font-size:13px;color:#57606a;margin-bottom:4px} .head b{color:#1f2328}
.over{color:#b42318;font-weight:600}
.prompt{font-size:13px;color:#424a53;margin-bottom:6px}
.resp{white-space:pre-wrap;font:13px/1.7 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.tok{border-radius:2px}
"""


def _image_src(image: Path, page: Path) -> str:
    return quote(Path(os.path.relpath(Path(image).resolve(), Path(page).resolve().parent)).as_posix())


def write_html(path: str | Path, sections: Sequence[Section], *, title: str = "persona-guard screening report",
               meta: Sequence[str] = (), reference: str = "last_prompt", images: Sequence[tuple[str, Path]] = (),
               notes: Sequence[str] = ()) -> Path:
    """Write the report page: per section, each sample's response with every token shaded by
    its reading (red along the vector, blue against it, intensity up to the section's
    :func:`colour_scale`; the number on hover), a legend, and the images.

    Args:
        path: the HTML file to write.
        sections: one per screened key.
        title: the page title.
        meta: lines shown under the title (data, model, mode).
        reference: the readings' reference kind (see the module docstring), stated on the page.
        images: ``(caption, path)`` pairs, linked relative to the page (histograms, scatter).
        notes: one-line notes (for example a plot that could not be drawn).
    """
    path = Path(path)
    esc = html.escape
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(title)}</title><style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    parts += [f'<p class="meta">{esc(line)}</p>' for line in meta]
    parts += [f'<p class="note">{esc(note)}</p>' for note in notes]
    if images:
        parts.append('<div class="charts">')
        for caption, image in images:
            parts.append(f'<figure><img src="{esc(_image_src(image, path))}" alt="{esc(caption)}">'
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
        parts.append("</div>")
    for section in sections:
        values = [v for item in section.samples for v in item.reading.values]
        scale = colour_scale(values)
        parts.append(f"<h2>{esc(section.name)} (layer {section.layer}): the {len(section.samples)} highest "
                     f"{esc(section.score_label)} scores</h2>")
        parts.append(f'<p class="ref">Each token: its projection on the unit {esc(section.name)} vector at layer '
                     f"{section.layer} {esc(REFERENCE_TEXT[reference])}.</p>")
        parts.append(f'<div class="legend"><span>against the vector {_num(-scale, 2)}</span><span class="bar"></span>'
                     f"<span>{_num(scale, 2)} along the vector</span><span>(shading saturates at ±{scale:.2f}; "
                     "hover a token for its value)</span></div>")
        for item in section.samples:
            reading = item.reading
            head = [f"<b>#{item.rank}</b>", esc(reading.id), f"{esc(section.score_label)} <b>{_num(item.score)}</b>",
                    f"z {_num(item.z, 2)}", f"mean of tokens {_num(reading.mean)}",
                    f"reference {_num(reading.reference)}", f"{len(reading.values)} tokens"]
            if reading.truncated:
                head.append("truncated to the window")
            if item.over_threshold:
                head.append('<span class="over">over threshold</span>')
            spans = "".join(f'<span class="tok" style="background:{_shade(v, scale)}" title="{v:+.3f}">{esc(t)}</span>'
                            for t, v in zip(reading.tokens, reading.values))
            parts.append(f'<div class="sample"><div class="head">{" · ".join(head)}</div>'
                         f'<div class="prompt">User: {esc(_trim(item.prompt))}</div>'
                         f'<div class="resp">{spans}</div></div>')
    if not sections:
        parts.append('<p class="note">No scored samples to explain.</p>')
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


# -- the screen's report ----------------------------------------------------------------------------

def explain_screen(out_dir: str | Path, model, tokenizer, vectors: Sequence[PersonaVector], result: ScreenResult,
                   samples: Sequence[Sample], over: dict[int, list[str]], *, top: int = 20,
                   report_files: dict[str, Path] | None = None, summary: dict | None = None,
                   notes: Sequence[str] = (), max_length: int | None = None,
                   layer_path: str | None = None) -> Path:
    """Write ``out_dir/report.html``: per screened key, the ``top`` highest-scoring samples read
    token by token (reference: the last prompt token in approx mode, the base response in full
    mode), with the run's histograms and scatter.

    Args:
        out_dir: the report directory.
        model, tokenizer: the screened model.
        vectors: the screened vectors (one per trait).
        result: the screen's scores.
        samples: the screened samples, in ``result`` order.
        over: sample index -> keys over their threshold.
        top: samples per key.
        report_files: the report's other files by kind (``hist_<name>`` and ``scatter`` PNGs are shown).
        summary: the run's summary (data, model and mode are shown under the title).
        notes: one-line notes for the page (a plot that could not be drawn).
        max_length: the screen's window (``ScreenConfig.max_length``).
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    by_trait = {v.trait: v for v in vectors}
    full = result.mode == "full"
    reference = "base" if full else "last_prompt"
    sections = []
    for key in result.keys:
        entry = [s.scores[key.name] for s in result.samples]  # result.samples[p] scores samples[p]
        # Full mode reads tokens against the base response: samples without one cannot be shown.
        ranked = sorted((p for p in range(len(samples)) if entry[p]["score"] is not None
                         and (not full or entry[p]["base_projection"] is not None)),
                        key=lambda p: (-entry[p]["score"], p))[:top]
        base = [entry[p]["base_projection"] for p in ranked] if full else None
        readings = token_readings(model, tokenizer, [samples[p] for p in ranked], by_trait[key.trait], key.layer,
                                  reference=reference, base_projections=base, max_length=max_length,
                                  layer_path=layer_path) if ranked else []
        # Ranked by the screen's score; shown with the raw reading the tokens average to.
        shown = result.raw_field
        items = [ExplainedSample(reading, rank, entry[p][shown], entry[p]["z"],
                                 key.name in over.get(samples[p].index, []), samples[p].last_user)
                 for rank, (p, reading) in enumerate(zip(ranked, readings), start=1)]
        sections.append(Section(key.name, key.layer, "ΔP" if full else "approx ΔP", items))
    images = []
    for kind, path in (report_files or {}).items():
        if kind.startswith("hist_"):
            images.append((f"distribution of {kind[len('hist_'):]} scores", path))
        elif kind == "scatter":
            images.append((f"{result.keys[0].name} against {result.keys[1].name}", path))
    meta = []
    if summary:
        meta.append(f"{summary.get('samples')} samples from {summary.get('data')} · model {summary.get('model')} · "
                    f"{summary.get('mode')} mode · dropped {summary.get('dropped')}")
    return write_html(Path(out_dir) / "report.html", sections, meta=meta, reference=reference, images=images,
                      notes=notes)
