"""Research for the mixed-data screening score: which score survives content-type variance?

Two steps. ``cache`` runs the embedded model once over a labelled screening set (the mixed set
benchmarks/data/screen_mixed.jsonl, and the paired set benchmarks/data/screen_eval.jsonl) and
saves, for every sample and every layer, the response-mean, prompt-mean and last-prompt-token
activations, the response-mean activation of the base model's own greedy answer (full mode), and
per-token projections on the three default persona vectors and on 16 random directions per layer
(for token-maximum and tail-mean variants), under benchmarks/out/ (gitignored). ``evaluate`` then
scores every candidate from those arrays (numpy only, seconds): choices are made on the mixed
set's ``selection`` half and reported on its ``heldout`` half. Unsupervised statistics (means,
principal components, covariances) are fitted, without labels, on the half being scored, as a
user would fit them on the data they screen; nothing fitted on one half touches the other.

    .venv/bin/python benchmarks/screening_candidates.py cache       # about 10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/screening_candidates.py evaluate    # writes RESULTS.md section screening_candidates
"""

from __future__ import annotations

import argparse
import tempfile
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, machine, vector_with_layer, write_section  # noqa: E402

from guard.core.forward import forward_until, pad_batch, plan_batches  # noqa: E402
from guard.core.generation import GenerationCache, SamplingConfig, cached_generate  # noqa: E402
from guard.core.layers import capture  # noqa: E402
from guard.core.models import eval_mode, load_model, model_name, state_fingerprint  # noqa: E402
from guard.core.stats import _auroc_np, auroc_ci, random_directions  # noqa: E402
from guard.screen.samples import load_samples  # noqa: E402
from guard.screen.scoring import ScreenConfig, Screener, fit_window  # noqa: E402

HERE = Path(__file__).parent
DATASETS = {"mixed": HERE / "data" / "screen_mixed.jsonl", "eval": HERE / "data" / "screen_eval.jsonl"}
TRAITS = ["sycophancy", "evil", "hallucination"]
N_RANDOM_TOKEN = 16  # random directions per layer with per-token projections
MAX_NEW_TOKENS = ScreenConfig().max_new_tokens


def cache_path(name: str) -> Path:
    return OUT / f"screen_acts_{name}.npz"


# ------------------------------------------------------------------------------------------------
# cache: one forward per sample (and per base answer), every layer
# ------------------------------------------------------------------------------------------------

@torch.inference_mode()
def _read(model, prompts, responses, units_all, token_budget=4096, max_batch=32):
    """Per sample and layer: response mean, prompt mean, last prompt token, mean per-token norm;
    per response token and layer: projections on ``units_all[layer]`` ((K, d)) and the norm."""
    n, n_layers = len(prompts), units_all.shape[0]
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    d = units_all.shape[-1]
    resp = np.zeros((n, n_layers, d), np.float32)
    pmean = np.zeros_like(resp)
    last = np.zeros_like(resp)
    norm_mean = np.zeros((n, n_layers), np.float32)
    tok_proj = [None] * n
    tok_norm = [None] * n
    layers = list(range(n_layers))
    units_t = torch.as_tensor(units_all)
    with eval_mode(model):
        for batch in plan_batches(lengths, max_batch, token_budget):
            ids, attn = pad_batch([prompts[i] + responses[i] for i in batch], 0, "cpu", side="right")
            with capture(model, layers, position="all", attention_mask=attn) as acts:
                forward_until(model, ids, attn, max(layers))
            for row, i in enumerate(batch):
                p, r = len(prompts[i]), len(responses[i])
                h = torch.stack([acts[layer][row, :p + r] for layer in layers], dim=0)  # (L, T, d)
                hr = h[:, p:p + r]
                resp[i] = hr.mean(1).numpy()
                pmean[i] = h[:, :p].mean(1).numpy()
                last[i] = h[:, p - 1].numpy()
                norms = hr.norm(dim=-1)  # (L, r)
                norm_mean[i] = norms.mean(1).numpy()
                tok_proj[i] = torch.einsum("ltd,lkd->tlk", hr, units_t).numpy().astype(np.float32)
                tok_norm[i] = norms.T.numpy().astype(np.float32)
    offsets = np.cumsum([0] + [len(r) for r in responses])
    return {"resp": resp, "pmean": pmean, "last": last, "norm_mean": norm_mean,
            "tok_proj": np.concatenate(tok_proj), "tok_norm": np.concatenate(tok_norm), "offsets": offsets}


def build_cache(name: str, model, tokenizer, vectors, log) -> None:
    path = DATASETS[name]
    source = load_samples(path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    screener = Screener(model, tokenizer, vectors, ScreenConfig(mode="full"))
    prompts, responses = screener._tokenize(source.samples)
    for i in range(len(prompts)):
        prompts[i], responses[i], cut = fit_window(prompts[i], responses[i], screener.window)
        assert not cut
    n_layers, d = vectors[0].num_layers, vectors[0].hidden_size
    trait_units = np.stack([[v.unit(layer).float().numpy() for v in vectors] for layer in range(n_layers)])
    rand_units = np.stack([random_directions(N_RANDOM_TOKEN, d, seed=1000 + layer).numpy()
                           for layer in range(n_layers)])
    units_all = np.concatenate([trait_units, rand_units], axis=1).astype(np.float32)  # (L, 3 + R, d)
    partial = OUT / f"screen_acts_{name}.train.npz"  # kept, so an interrupted cache run resumes here
    if partial.exists():
        train = dict(np.load(partial))
        log(f"{name}: training responses from {partial}")
    else:
        started = time.perf_counter()
        train = _read(model, prompts, responses, units_all)
        log(f"{name}: training responses read in {time.perf_counter() - started:.0f} s")
        np.savez(partial, **train)
    # Base answers exactly as Screener's full mode makes them (same cache key).
    model_identity = [model_name(model), state_fingerprint(model)]
    room = max(1, screener.window - MAX_NEW_TOKENS)
    base_prompts = [p[-room:] for p in prompts]
    cache = GenerationCache(OUT / "base_responses.sqlite")
    started = time.perf_counter()
    try:
        base_ids, made = cached_generate(model, tokenizer, base_prompts, screener.sampling, cache,
                                         ":".join(model_identity), batch_size=32, progress=True, desc="base answers")
    finally:
        cache.close()
    log(f"{name}: {made} base answers generated in {time.perf_counter() - started:.0f} s")
    first = {}
    for i, (p, b) in enumerate(zip(base_prompts, base_ids)):
        first.setdefault((tuple(p), tuple(b)), i)
    unique = sorted(set(first.values()))
    has_base = np.array([len(b) > 0 for b in base_ids])
    ok = [i for i in unique if base_ids[i]]
    base = _read(model, [base_prompts[i] for i in ok], [base_ids[i] for i in ok], units_all)
    base_resp = np.full_like(train["resp"], np.nan)
    pos = {i: j for j, i in enumerate(ok)}
    for i in range(len(prompts)):
        j = pos.get(first[(tuple(base_prompts[i]), tuple(base_ids[i]))])
        if j is not None:
            base_resp[i] = base["resp"][j]
    meta = [{k: r.get(k) for k in ("id", "kind", "role", "category", "split", "pair", "trait", "label")} for r in records]
    np.savez(cache_path(name), resp=train["resp"], pmean=train["pmean"], last=train["last"],
             norm_mean=train["norm_mean"], tok_proj=train["tok_proj"], tok_norm=train["tok_norm"],
             offsets=train["offsets"], base_resp=base_resp, has_base=has_base, trait_units=trait_units,
             rand_units=rand_units, pos_mean=np.stack([v.pos_mean.float().numpy() for v in vectors], 1)
             if getattr(vectors[0], "pos_mean", None) is not None else np.zeros(0),
             neg_mean=np.stack([v.neg_mean.float().numpy() for v in vectors], 1)
             if getattr(vectors[0], "neg_mean", None) is not None else np.zeros(0),
             prompt_tokens=np.array([len(p) for p in prompts]), response_tokens=np.array([len(r) for r in responses]),
             recommended=np.array([v.default_layer() for v in vectors]), meta=json.dumps(meta),
             base_text=json.dumps([tokenizer.decode(b, skip_special_tokens=True) for b in base_ids]))
    # Sanity: the library's own numbers at the recommended layers equal the cached ones.
    check = Screener(model, tokenizer, vectors, ScreenConfig(mode="full"), generation_cache=OUT / "base_responses.sqlite")
    result = check.score(source.samples)
    worst = 0.0
    for k, v in enumerate(vectors):
        layer = v.default_layer()
        u = trait_units[layer, k]
        for i, s in enumerate(result.samples):
            sc = s.scores[v.trait]
            worst = max(worst, abs(sc["projection"] - float(train["resp"][i, layer] @ u)),
                        abs(sc["approx"] - float((train["resp"][i, layer] - train["last"][i, layer]) @ u)))
            if sc["delta_p"] is not None:
                worst = max(worst, abs(sc["delta_p"] - float((train["resp"][i, layer] - base_resp[i, layer]) @ u)))
    log(f"{name}: cached numbers match the Screener's to {worst:.1e}")
    if worst > 1e-3:
        raise SystemExit(f"{name}: cache disagrees with the Screener by {worst}")


def cmd_cache(args) -> None:
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    OUT.mkdir(parents=True, exist_ok=True)
    model, tokenizer, _ = load_model()
    vectors = [vector_with_layer(model, tokenizer, t, log) for t in TRAITS]
    for name in args.datasets:
        build_cache(name, model, tokenizer, vectors, log)


# ------------------------------------------------------------------------------------------------
# evaluate: every candidate from the cached arrays
# ------------------------------------------------------------------------------------------------

N_RANDOM = 16        # random directions of equal norm per candidate (the control)
N_BOOT = 2000


class Data:
    """One cached dataset, with the labels of the mixed set's halves."""

    def __init__(self, name: str):
        z = np.load(cache_path(name))
        self.name = name
        self.resp, self.last, self.pmean = z["resp"], z["last"], z["pmean"]
        self.base = z["base_resp"]
        self.norm_mean = z["norm_mean"]
        self.tok_proj, self.tok_norm, self.offsets = z["tok_proj"], z["tok_norm"], z["offsets"]
        self.trait_units, self.rand_units = z["trait_units"], z["rand_units"]
        self.pos_mean, self.neg_mean = z["pos_mean"], z["neg_mean"]
        self.recommended = [int(x) for x in z["recommended"]]
        self.meta = json.loads(str(z["meta"]))
        self.n, self.n_layers, self.d = self.resp.shape
        if name == "mixed":
            self.kind = [m["kind"] for m in self.meta]
            self.role = [m["role"] for m in self.meta]
            self.split = np.array([m["split"] for m in self.meta])
            self.group = [m["kind"] if m["role"] != "benign" else "benign:" + m["category"] for m in self.meta]
        else:
            self.kind = [m["trait"] for m in self.meta]
            self.role = ["trait" if m["label"] == 1 else "normal" for m in self.meta]
            self.split = np.array(["all"] * self.n)
            self.group = self.kind

    def labels(self, trait: str, idx: np.ndarray) -> np.ndarray:
        return np.array([self.kind[i] == trait and self.role[i] == "trait" for i in idx])


def rand_dirs(d: int, layer: int, n: int = N_RANDOM) -> np.ndarray:
    """(d, n) unit random directions; the same ones for every candidate at a layer."""
    return random_directions(n, d, seed=5000 + layer).numpy().astype(np.float64).T


# --- the candidate scores: f(data, idx, layer, trait_k, directions (d, m), params) -> (len(idx), m)

def _features(data: Data, idx, layer: int, variant: str) -> np.ndarray:
    a = data.resp[idx, layer].astype(np.float64)
    if variant == "resp":
        return a
    if variant == "approx":
        return a - data.last[idx, layer]
    if variant == "pmean":
        return a - data.pmean[idx, layer]
    if variant == "full":
        return a - data.base[idx, layer]
    raise ValueError(variant)


_svd_cache: dict = {}


def _svd(data: Data, idx, layer: int, variant: str):
    key = (data.name, tuple(idx), layer, variant)
    if key not in _svd_cache:
        x = _features(data, idx, layer, variant)
        ok = np.isfinite(x).all(1)
        mu = x[ok].mean(0)
        xc = np.where(ok[:, None], x - mu, np.nan)
        u, s, vt = np.linalg.svd(np.nan_to_num(xc[ok]), full_matrices=False)
        _svd_cache[key] = (x, ok, mu, xc, u, s, vt)
    return _svd_cache[key]


def score_linear(data, idx, layer, k, dirs, variant="resp"):
    return _features(data, idx, layer, variant) @ dirs


def score_mean_removed(data, idx, layer, k, dirs, variant="resp", source="model"):
    """Each direction with its component along a mean activation removed: the model's (the
    vector file's (pos_mean + neg_mean) / 2 of this trait) or the screened data's."""
    x = _features(data, idx, layer, variant)
    if source == "model":
        m = (data.pos_mean[layer, k] + data.neg_mean[layer, k]) / 2
    else:
        m = data.resp[idx, layer].mean(0)
    m = m / np.linalg.norm(m)
    d_perp = dirs - np.outer(m, m @ dirs)
    return x @ d_perp


def score_cosine(data, idx, layer, k, dirs, variant="resp", center=False, norm="vector"):
    """Projection divided by the activation's norm (per-sample normalisation)."""
    x = _features(data, idx, layer, variant)
    if center:
        x = x - np.nanmean(x, 0)
    if norm == "vector":
        scale = np.linalg.norm(x, axis=1)
    else:  # mean per-token norm of the response
        scale = data.norm_mean[idx, layer]
    return (x @ dirs) / scale[:, None]


def score_pca(data, idx, layer, k, dirs, variant="resp", remove=4):
    """Centered on the screened data's mean, its top ``remove`` principal components removed."""
    x, ok, mu, xc, u, s, vt = _svd(data, idx, layer, variant)
    out = np.full((len(idx), dirs.shape[1]), np.nan)
    out[ok] = (u[:, remove:] * s[remove:]) @ (vt[remove:] @ dirs)
    return out


def score_whiten(data, idx, layer, k, dirs, variant="resp", alpha=0.1):
    """(x - mean) (Sigma + lambda I)^-1 v with Sigma the screened data's covariance,
    lambda = alpha x its mean eigenvalue (the Fisher direction for a shift along v)."""
    x, ok, mu, xc, u, s, vt = _svd(data, idx, layer, variant)
    n = ok.sum()
    eig = s ** 2 / (n - 1)
    lam = alpha * (s ** 2).sum() / (n - 1) / data.d
    out = np.full((len(idx), dirs.shape[1]), np.nan)
    # directions' parts outside the data's span meet zero variance in xc: they score 0
    out[ok] = (u * (s * lam / (eig + lam))) @ (vt @ dirs)
    return out


def score_tokens(data, idx, layer, k, dirs_cols, stat="max", q=0.25, minus_last=False):
    """Per-token projections reduced by max / tail mean / top-q mean (token caches only hold the
    trait vectors and the stored random directions: ``dirs_cols`` are their columns)."""
    out = np.zeros((len(idx), len(dirs_cols)))
    for row, i in enumerate(idx):
        t = data.tok_proj[data.offsets[i]:data.offsets[i + 1], layer][:, dirs_cols]
        if stat == "max":
            v = t.max(0)
        elif stat == "tail":
            v = t[int(np.floor(len(t) * (1 - q))):].mean(0)
        elif stat == "topq":
            m = max(1, int(np.ceil(len(t) * q)))
            v = np.sort(t, axis=0)[-m:].mean(0)
        else:
            raise ValueError(stat)
        out[row] = v
    if minus_last:
        units = np.concatenate([data.trait_units[layer], data.rand_units[layer]])[dirs_cols]
        out -= data.last[idx, layer] @ units.T
    return out


def _kmeans(x: np.ndarray, c: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, c):
        dist = np.min([((x - m) ** 2).sum(1) for m in centers], axis=0)
        centers.append(x[rng.choice(len(x), p=dist / dist.sum())])
    centers = np.array(centers)
    for _ in range(iters):
        assign = ((x[:, None] - centers[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[assign == j].mean(0) if (assign == j).any() else centers[j] for j in range(c)])
        if np.allclose(new, centers):
            break
        centers = new
    return assign


def score_cluster_z(data, idx, layer, k, dirs, variant="resp", on="last", clusters=8):
    """z-score within clusters of the screened data (k-means on prompt or response
    activations, unit-normalised): a same-kind reference found without labels."""
    feats = {"last": data.last, "pmean": data.pmean, "resp": data.resp}[on][idx, layer].astype(np.float64)
    feats = feats - feats.mean(0)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    assign = _kmeans(feats, clusters)
    s = _features(data, idx, layer, variant) @ dirs
    out = np.zeros_like(s)
    for j in np.unique(assign):
        rows = assign == j
        mu, sd = s[rows].mean(0), s[rows].std(0, ddof=1) if rows.sum() > 1 else 1.0
        out[rows] = (s[rows] - mu) / (sd + 1e-12)
    return out


def score_prompt_residual(data, idx, layer, k, dirs, variant="resp", remove=8):
    """The response projection minus its least-squares prediction from the prompt's top
    ``remove`` principal components (last prompt token, fitted on the screened data)."""
    p = data.last[idx, layer].astype(np.float64)
    pc = p - p.mean(0)
    u, s, vt = np.linalg.svd(pc, full_matrices=False)
    basis = np.concatenate([np.ones((len(idx), 1)) / np.sqrt(len(idx)), u[:, :remove]], axis=1)
    y = _features(data, idx, layer, variant) @ dirs
    return y - basis @ (basis.T @ y)


def score_ortho(data, idx, layer, k, dirs, variant="resp", center=False):
    """Each direction with the other screened traits' vectors (at the same layer) projected out:
    a sample pushed toward another trait stops counting for this one."""
    others = np.stack([data.trait_units[layer, j] for j in range(len(TRAITS)) if j != k], 1).astype(np.float64)
    q, _ = np.linalg.qr(others)
    d_perp = dirs - q @ (q.T @ dirs)
    x = _features(data, idx, layer, variant)
    if center:
        x = x - x.mean(0)
    return x @ d_perp


def _other_scores(data, idx, k, variant):
    """The other traits' scores (same variant, each at its recommended layer), z-scored on the data."""
    out = []
    for j in range(len(TRAITS)):
        if j == k:
            continue
        layer = data.recommended[j]
        s = _features(data, idx, layer, variant) @ data.trait_units[layer, j].astype(np.float64)
        out.append((s - s.mean()) / s.std())
    return np.stack(out, 1)


def score_resid_others(data, idx, layer, k, dirs, variant="resp"):
    """The score minus its least-squares fit (over the screened data) on the other traits' scores."""
    y = _features(data, idx, layer, variant) @ dirs
    basis = np.concatenate([np.ones((len(idx), 1)), _other_scores(data, idx, k, variant)], 1)
    beta, *_ = np.linalg.lstsq(basis, y, rcond=None)
    return y - basis @ beta


def score_relative(data, idx, layer, k, dirs, variant="resp", margin="max"):
    """z-score on the screened data minus the largest (or mean) z-score of the other traits:
    how much more this sample leans toward this trait than toward any other screened one."""
    y = _features(data, idx, layer, variant) @ dirs
    z = (y - y.mean(0)) / y.std(0)
    other = _other_scores(data, idx, k, variant)
    o = other.max(1) if margin == "max" else other.mean(1)
    return z - o[:, None]


def score_combo(data, idx, layer, k, dirs, beta=1.0, ortho=False, mean_removed=False, shift=0):
    """The data-free family: response projection minus ``beta`` x the last-prompt-token one
    (beta 0: raw, 1: the approximation), on the direction with the other screened traits'
    vectors projected out (``ortho``) and/or the model's mean activation direction
    (``mean_removed``), read ``shift`` layers from the given one."""
    layer = min(max(layer + shift, 0), data.n_layers - 1)
    dirs = dirs.copy()
    dirs[:, 0] = data.trait_units[layer, k]
    if mean_removed:
        m = (data.pos_mean[layer, k] + data.neg_mean[layer, k]) / 2
        m = m / np.linalg.norm(m)
        dirs = dirs - np.outer(m, m @ dirs)
    if ortho:
        others = np.stack([data.trait_units[layer, j] for j in range(len(TRAITS)) if j != k], 1).astype(np.float64)
        q, _ = np.linalg.qr(others)
        dirs = dirs - q @ (q.T @ dirs)
    x = data.resp[idx, layer].astype(np.float64) - beta * data.last[idx, layer]
    return x @ dirs


def sketch_basis(d: int, r: int, seed: int = 0) -> np.ndarray:
    """(d, r) random orthonormal directions: a fixed-size per-sample summary of an activation."""
    g = np.random.default_rng(seed).standard_normal((d, r))
    q, _ = np.linalg.qr(g)
    return q


def score_sketch(data, idx, layer, k, dirs, variant="resp", r=64, mode="pca", remove=8, alpha=0.1):
    """What a library can do with r numbers per sample: the projections y = a R on r random
    orthonormal directions, kept beside each direction's projection s = a v. Post-processing
    over the screened data: ``mode="pca"`` removes from s its least-squares fit on the top
    ``remove`` principal components of y (randomised PCA); ``mode="ridge"`` removes its ridge
    fit on all of y (lambda = alpha x the mean eigenvalue of y's covariance)."""
    x = _features(data, idx, layer, variant)
    y = x @ sketch_basis(data.d, r)
    s = x @ dirs
    y = y - y.mean(0)
    s = s - s.mean(0)
    if mode == "pca":
        u, sv, _ = np.linalg.svd(y, full_matrices=False)
        basis = u[:, :remove]
        return s - basis @ (basis.T @ s)
    cov = y.T @ y
    lam = alpha * np.trace(cov) / r
    beta = np.linalg.solve(cov + lam * np.eye(r), y.T @ s)
    return s - y @ beta


def score_layers(data, idx, layer, k, dirs, base_fn, span=2, **kw):
    """Mean over layers layer-span..layer+span of the base score, each z-scored on the
    screened data (so layers weigh alike). Random controls: the same random directions at
    every layer."""
    total = 0
    for l_ in range(max(0, layer - span), min(data.n_layers - 1, layer + span) + 1):
        dd = dirs.copy()
        dd[:, 0] = data.trait_units[l_, k]  # column 0 is the trait direction at each layer
        s = base_fn(data, idx, l_, k, dd, **kw)
        total = total + (s - np.nanmean(s, 0)) / np.nanstd(s, 0)
    return total


# --- metrics ------------------------------------------------------------------------------------

def precision_at_k(scores: np.ndarray, labels: np.ndarray) -> float:
    ok = np.isfinite(scores)
    s, y = scores[ok], labels[ok]
    k = int(y.sum())
    order = np.argsort(-s, kind="stable")
    return float(y[order[:k]].mean())


def metric_cis(scores: np.ndarray, labels: np.ndarray, seed: int = 0):
    """AUROC and precision@k (k = positives), each with a stratified 95% bootstrap interval over
    items (positives and negatives resampled apart, so k stays fixed)."""
    ok = np.isfinite(scores)
    s, y = scores[ok], labels[ok]
    pos, neg = s[y], s[~y]
    a = auroc_ci(pos, neg, n_boot=N_BOOT, seed=seed)
    rng = np.random.default_rng(seed)
    boot = np.empty(N_BOOT)
    for b in range(N_BOOT):
        pp = pos[rng.integers(0, pos.size, pos.size)]
        nn = neg[rng.integers(0, neg.size, neg.size)]
        boot[b] = precision_at_k(np.concatenate([pp, nn]), np.r_[np.ones(pp.size, bool), np.zeros(nn.size, bool)])
    p = precision_at_k(s, y)
    low, high = np.quantile(boot, [0.025, 0.975])
    return {"auroc": a.value, "auroc_ci": [a.low, a.high], "p_at_k": p, "p_at_k_ci": [float(low), float(high)],
            "positives": int(y.sum()), "negatives": int((~y).sum())}


def quick_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    ok = np.isfinite(scores)
    s, y = scores[ok], labels[ok]
    return _auroc_np(s[y], s[~y])


# --- candidates ---------------------------------------------------------------------------------

def candidates() -> list[tuple[str, str, Callable, dict]]:
    """(family, setting label, function, params). Every family's settings are compared on the
    selection half; the best setting of each family is then reported on the held-out half."""
    out = []
    for v in ("resp", "approx", "pmean", "full"):
        out.append((f"linear:{v}", v, score_linear, {"variant": v}))
    for v in ("resp", "approx"):
        for src in ("model", "data"):
            out.append((f"mean-removed:{v}", src, score_mean_removed, {"variant": v, "source": src}))
        for center in (False, True):
            for norm in ("vector", "tokens"):
                out.append((f"cosine:{v}", f"center={center},norm={norm}", score_cosine,
                            {"variant": v, "center": center, "norm": norm}))
    for v in ("resp", "approx", "full"):
        for r in (0, 1, 2, 4, 8, 16, 32, 64):
            out.append((f"pca-removed:{v}", f"k={r}", score_pca, {"variant": v, "remove": r}))
        for a in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0):
            out.append((f"whiten:{v}", f"alpha={a}", score_whiten, {"variant": v, "alpha": a}))
    for v in ("resp", "approx"):
        for on in ("last", "resp"):
            for c in (2, 4, 8, 16):
                out.append((f"cluster-z:{v}", f"on={on},c={c}", score_cluster_z, {"variant": v, "on": on, "clusters": c}))
        for r in (1, 2, 4, 8, 16, 32):
            out.append((f"prompt-residual:{v}", f"k={r}", score_prompt_residual, {"variant": v, "remove": r}))
    for beta in (0.0, 0.25, 0.5, 0.75, 1.0):
        for ortho in (False, True):
            for mean_removed in (False, True):
                for shift in (-2, 0, 2):
                    out.append(("combo", f"beta={beta},ortho={ortho},mean_removed={mean_removed},shift={shift}",
                                score_combo, {"beta": beta, "ortho": ortho, "mean_removed": mean_removed,
                                              "shift": shift}))
    for v in ("resp", "approx", "full"):
        for center in (False, True):
            out.append((f"ortho:{v}", f"center={center}", score_ortho, {"variant": v, "center": center}))
        out.append((f"resid-others:{v}", "lstsq", score_resid_others, {"variant": v}))
        for margin in ("max", "mean"):
            out.append((f"relative:{v}", margin, score_relative, {"variant": v, "margin": margin}))
    for v in ("resp", "approx"):
        for r in (16, 32, 64, 128):
            for rm in (2, 4, 8, 16):
                if rm < r:
                    out.append((f"sketch-pca:{v}", f"r={r},k={rm}", score_sketch,
                                {"variant": v, "r": r, "mode": "pca", "remove": rm}))
            for a in (0.01, 0.1, 1.0, 10.0):
                out.append((f"sketch-ridge:{v}", f"r={r},alpha={a}", score_sketch,
                            {"variant": v, "r": r, "mode": "ridge", "alpha": a}))
    for span in (1, 2, 4):
        out.append(("layers:resp", f"span={span}", score_layers, {"base_fn": score_linear, "span": span}))
        out.append(("layers:whiten", f"span={span},alpha=0.1", score_layers,
                    {"base_fn": score_whiten, "span": span, "alpha": 0.1}))
    return out


TOKEN_CANDIDATES = [("tokens:max", "max", {"stat": "max"}),
                    ("tokens:max-last", "max-last", {"stat": "max", "minus_last": True})] + \
    [("tokens:tail", f"q={q}", {"stat": "tail", "q": q}) for q in (0.1, 0.25, 0.5)] + \
    [("tokens:topq", f"q={q}", {"stat": "topq", "q": q}) for q in (0.1, 0.25, 0.5)]


def evaluate_one(data, idx, trait_k, layer, fn, params, token=False, n_random=N_RANDOM):
    """Scores (len(idx),) for the trait direction and (len(idx), n_random) for random ones."""
    if token:
        cols = [trait_k] + list(range(len(TRAITS), len(TRAITS) + min(n_random, N_RANDOM_TOKEN)))
        s = score_tokens(data, idx, layer, trait_k, cols, **params)
    else:
        dirs = np.concatenate([data.trait_units[layer, trait_k][:, None].astype(np.float64),
                               rand_dirs(data.d, layer, n_random)], axis=1)
        s = fn(data, idx, layer, trait_k, dirs, **params)
    return s[:, 0], s[:, 1:]


def eta_squared(values: np.ndarray, groups: list[str]) -> float:
    """Fraction of the variance of ``values`` explained by content group (between-group / total)."""
    values = np.asarray(values, float)
    ok = np.isfinite(values)
    v, g = values[ok], np.array(groups)[ok]
    grand = v.mean()
    between = sum((g == x).sum() * (v[g == x].mean() - grand) ** 2 for x in np.unique(g))
    return float(between / ((v - grand) ** 2).sum())


def run_candidate(data, idx, trait_k, layer, cand, n_random=N_RANDOM):
    family, label, fn, params = cand
    return evaluate_one(data, idx, trait_k, layer, fn, params, token=family.startswith("tokens"), n_random=n_random)


def full_metrics(data, idx, trait_k, layer, cand, seed=0):
    """Metrics with CIs for the trait direction; mean and max of the random directions' metrics."""
    trait = TRAITS[trait_k]
    y = data.labels(trait, idx)
    s, r = run_candidate(data, idx, trait_k, layer, cand)
    out = metric_cis(s, y, seed)
    ra = [quick_auroc(r[:, j], y) for j in range(r.shape[1])]
    rp = [precision_at_k(r[:, j], y) for j in range(r.shape[1])]
    out.update({"layer": layer, "random_auroc_mean": float(np.mean(ra)), "random_auroc_max": float(np.max(ra)),
                "random_p_at_k_mean": float(np.mean(rp)), "random_p_at_k_max": float(np.max(rp)),
                "random_n": r.shape[1]})
    neg = ~y
    groups = [data.group[i] for i in idx]
    out["eta2_negatives"] = eta_squared(s[neg], [g for g, n in zip(groups, neg) if n])
    out["eta2_negatives_random_mean"] = float(np.mean([eta_squared(r[neg, j], [g for g, n in zip(groups, neg) if n])
                                                       for j in range(r.shape[1])]))
    return out


def unpaired_auroc(data, idx, trait_k, layer, cand, draws=10):
    """Mean AUROC over ``draws`` subsets that keep one randomly chosen reply per paired prompt,
    so a score fitted on the screened data cannot lean on a prompt's two replies."""
    trait = TRAITS[trait_k]
    rng = np.random.default_rng(7)
    pairs = {}
    for i in idx:
        pairs.setdefault(data.meta[i].get("pair") or f"solo-{i}", []).append(i)
    values = []
    for _ in range(draws):
        keep = np.array(sorted(g[rng.integers(len(g))] for g in pairs.values()))
        s, _ = run_candidate(data, keep, trait_k, layer, cand, n_random=1)
        values.append(quick_auroc(s, data.labels(trait, keep)))
    return float(np.mean(values)), float(np.std(values))


def cmd_evaluate(args) -> None:
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    mixed = Data("mixed")
    sel = np.where(mixed.split == "selection")[0]
    held = np.where(mixed.split == "heldout")[0]
    cands = candidates() + [(f, l_, None, p) for f, l_, p in TOKEN_CANDIDATES]
    if args.only:
        cands = [c for c in cands if any(c[0].startswith(o) for o in args.only)]
    layers = range(mixed.n_layers)
    # 1. Selection half: AUROC of every setting at every layer (trait direction only).
    grid = {}
    started = time.perf_counter()
    for c_i, cand in enumerate(cands):
        for k in range(len(TRAITS)):
            y = mixed.labels(TRAITS[k], sel)
            for layer in layers:
                s, _ = run_candidate(mixed, sel, k, layer, cand, n_random=1)
                grid[(c_i, k, layer)] = quick_auroc(s, y)
    log(f"selection grid: {len(grid)} AUROCs in {time.perf_counter() - started:.0f} s")
    # 2. Per family: best setting on selection, with the layer policy "recommended" (one setting
    # for every trait) and "selected" (per trait, the layer with the best selection AUROC).
    rec = mixed.recommended
    families = {}
    for c_i, cand in enumerate(cands):
        at_rec = np.mean([grid[(c_i, k, rec[k])] for k in range(len(TRAITS))])
        best_layers = [max(layers, key=lambda l_: grid[(c_i, k, l_)]) for k in range(len(TRAITS))]
        at_sel = np.mean([grid[(c_i, k, best_layers[k])] for k in range(len(TRAITS))])
        for policy, value, chosen in (("recommended", at_rec, rec), ("selected", at_sel, best_layers)):
            key = (cand[0], policy)
            if key not in families or value > families[key]["selection_mean_auroc"]:
                families[key] = {"c_i": c_i, "setting": cand[1], "selection_mean_auroc": float(value),
                                 "layers": [int(x) for x in chosen]}
    # 3. Chosen settings: full metrics on both halves (random controls, CIs), and diagnostics.
    report = {"families": [], "command": "python benchmarks/screening_candidates.py " + " ".join(sys.argv[1:])}
    for (family, policy), entry in sorted(families.items()):
        cand = cands[entry["c_i"]]
        row = {"family": family, "policy": policy, "setting": entry["setting"], "layers": entry["layers"],
               "selection_mean_auroc": entry["selection_mean_auroc"], "traits": {}}
        for k, trait in enumerate(TRAITS):
            layer = entry["layers"][k]
            row["traits"][trait] = {"selection": full_metrics(mixed, sel, k, layer, cand),
                                    "heldout": full_metrics(mixed, held, k, layer, cand)}
        row["heldout_mean_auroc"] = float(np.mean([row["traits"][t]["heldout"]["auroc"] for t in TRAITS]))
        row["heldout_min_p_at_k"] = float(min(row["traits"][t]["heldout"]["p_at_k"] for t in TRAITS))
        report["families"].append(row)
        log(f"{family:28s} {policy:11s} {entry['setting']:26s} layers {entry['layers']} "
            f"sel {entry['selection_mean_auroc']:.3f} held {row['heldout_mean_auroc']:.3f} "
            + " ".join(f"{t[:4]} {row['traits'][t]['heldout']['auroc']:.2f}/{row['traits'][t]['heldout']['p_at_k']:.2f}"
                       f"(r{row['traits'][t]['heldout']['random_auroc_mean']:.2f}/{row['traits'][t]['heldout']['random_auroc_max']:.2f})"
                       for t in TRAITS))
    # every setting's selection AUROCs at the recommended layer, for the record
    report["selection_grid_recommended"] = [
        {"family": c[0], "setting": c[1], "auroc": [grid[(c_i, k, rec[k])] for k in range(len(TRAITS))]}
        for c_i, c in enumerate(cands)]
    OUT.joinpath("screen_candidates.json").write_text(json.dumps(report, indent=1))
    log(f"wrote {OUT / 'screen_candidates.json'}")


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def cmd_dtype(args) -> None:
    """Approximation-mode screening of the mixed set in float32 and in bfloat16: tokens/s (the
    two interleaved, best of ``--repeats``, each pinned to the same cores with ``taskset`` when
    given) and Spearman correlations of the bfloat16 scores with the float32 ones."""
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    source = load_samples(DATASETS["mixed"])
    models = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer, _ = load_model(dtype=dtype)
        models[dtype] = model
    vectors = [vector_with_layer(models["float32"], tokenizer, t, log) for t in TRAITS]
    screeners = {d: Screener(m, tokenizer, vectors, ScreenConfig(mode="approx", score=args.score))
                 for d, m in models.items()} if args.score else \
        {d: Screener(m, tokenizer, vectors, ScreenConfig(mode="approx")) for d, m in models.items()}
    prompts, responses = screeners["float32"]._tokenize(source.samples)
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    for screener in screeners.values():
        screener.score(source.samples[:16])  # warm-up
    times = {d: [] for d in screeners}
    results = {}
    for _ in range(args.repeats):
        for dtype, screener in screeners.items():
            started = time.perf_counter()
            results[dtype] = screener.score(source.samples)
            times[dtype].append(time.perf_counter() - started)
    rows, numbers = [], {"tokens": tokens, "threads": torch.get_num_threads(), "times": times}
    for dtype in screeners:
        best = min(times[dtype])
        numbers[dtype] = {"seconds": best, "tokens_per_s": tokens / best}
        rows.append(f"| {dtype} | {best:.2f} | {tokens / best:,.0f} |")
    numbers["bf16_over_fp32"] = numbers["bfloat16"]["tokens_per_s"] / numbers["float32"]["tokens_per_s"]
    corr = {}
    for v in vectors:
        for field in ("score", "approx", "projection"):
            a = [s.scores[v.trait][field] for s in results["float32"].samples]
            b = [s.scores[v.trait][field] for s in results["bfloat16"].samples]
            corr[f"{v.trait}:{field}"] = _spearman(a, b)
    numbers["spearman"] = corr
    log(json.dumps(numbers, indent=1))
    OUT.joinpath("screen_dtype.json").write_text(json.dumps(numbers, indent=1))
    command = "python benchmarks/screening_candidates.py " + " ".join(sys.argv[1:] if len(sys.argv) > 1 else [])
    body = "\n".join([
        "## Screening in bfloat16 on the CPU (embedded SmolLM2-135M-Instruct)", "",
        f"Command: `{command.strip()}` on {machine()}.", "",
        f"Approximation-mode screening of {len(source.samples)} samples of benchmarks/data/screen_mixed.jsonl "
        f"({tokens:,} tokens, three vectors at their recommended layers), float32 and bfloat16 interleaved, best of "
        f"{args.repeats}. {args.note}", "",
        "| dtype | seconds | tokens/s |", "|---|---:|---:|", *rows, "",
        f"bfloat16 / float32 throughput: {numbers['bf16_over_fp32']:.2f}x.", "",
        "Spearman correlation of the bfloat16 scores with the float32 ones: " + "; ".join(
            f"{k} {v:.4f}" for k, v in corr.items()) + ".",
    ])
    print(body)
    if args.record:
        write_section("screening_dtype", body)


# ------------------------------------------------------------------------------------------------
# report: the chosen default against the paper's scores, held out, with the library's own numbers
# ------------------------------------------------------------------------------------------------

# The rule, fixed before looking at the held-out half: among candidates that read each vector at
# its recommended layer (a user's own vector has no benchmark to pick a screening layer on), the
# highest mean selection-half AUROC. "relative:approx" (margin mean) scored 0.892 there, a
# three-layer average of it 0.895; we ship the single-layer one (one layer per vector, within
# 0.003 of the best). See cmd_evaluate's output for every family.
DEFAULT = ("relative:approx", "mean", score_relative, {"variant": "approx", "margin": "mean"})
BASELINES = [("ΔP (paper, full mode)", ("linear:full", "full", score_linear, {"variant": "full"})),
             ("approximation", ("linear:approx", "approx", score_linear, {"variant": "approx"})),
             ("raw projection", ("linear:resp", "resp", score_linear, {"variant": "resp"}))]


def _fmt(e: dict, key: str) -> str:
    return f"{e[key]:.2f} [{e[key + '_ci'][0]:.2f}, {e[key + '_ci'][1]:.2f}]"


def _library_scores(held_records: list[dict], log) -> tuple[dict, float]:
    """The held-out half screened by the library itself (``guard.screen.pipeline.screen`` with its
    defaults, three vectors): per trait, every sample's ``score``, and the seconds it took."""
    from guard.screen.pipeline import screen

    model, tokenizer, _ = load_model()
    vectors = [vector_with_layer(model, tokenizer, t, log) for t in TRAITS]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "heldout.jsonl"
        path.write_text("".join(json.dumps({"id": r["id"], "messages": r["messages"]}) + "\n" for r in held_records))
        started = time.perf_counter()
        run = screen(load_samples(path), model, tokenizer, vectors, ScreenConfig(), plots=False, explain_top=0)
        seconds = time.perf_counter() - started
    names = [k.name for k in run.result.keys]
    return {n: np.array([s.scores[n]["score"] for s in run.result.samples], float) for n in names}, seconds


def cmd_report(args) -> None:
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    mixed, paired = Data("mixed"), Data("eval")
    held = np.where(mixed.split == "heldout")[0]
    rec = mixed.recommended
    rows = {}
    for label, cand in [("relative (default)", DEFAULT), *BASELINES]:
        rows[label] = {t: full_metrics(mixed, held, k, rec[k], cand) for k, t in enumerate(TRAITS)}
    # The paired set: trait vs normal within each trait's 72 samples, every sample screened together.
    every = np.arange(paired.n)
    paired_rows = {}
    for label, cand in [("relative (default)", DEFAULT), *BASELINES]:
        paired_rows[label] = {}
        for k, t in enumerate(TRAITS):
            s, _ = run_candidate(paired, every, k, rec[k], cand, n_random=1)
            mine = np.array([paired.kind[i] == t for i in every])
            y = np.array([paired.role[i] == "trait" for i in every])
            a = auroc_ci(s[mine & y], s[mine & ~y], n_boot=N_BOOT)
            paired_rows[label][t] = (a.value, a.low, a.high)
    # The library's own default screen of the held-out half gives the same ranking.
    held_records = [json.loads(line) for line in DATASETS["mixed"].read_text().splitlines() if line.strip()]
    held_records = [r for r in held_records if r["split"] == "heldout"]
    library, seconds = _library_scores(held_records, log)
    library_check = []
    for k, t in enumerate(TRAITS):
        study, _ = run_candidate(mixed, held, k, rec[k], DEFAULT, n_random=1)
        y = mixed.labels(t, held)
        # The library's z-scores use the sample standard deviation (n - 1), the study's numpy's (n).
        scale = np.sqrt(len(held) / (len(held) - 1))
        library_check.append((t, float(np.max(np.abs(study - scale * library[t]))), quick_auroc(library[t], y),
                              precision_at_k(library[t], y)))
    n_pos = int(mixed.labels(TRAITS[0], held).sum())
    lines = ["## Screening a mixed dataset (embedded SmolLM2-135M-Instruct)", "",
             f"Commands: `python benchmarks/screening_candidates.py cache`, `... evaluate`, `... report` on {machine()}.",
             "",
             f"Data: `benchmarks/data/screen_mixed.jsonl`, {mixed.n} samples written for this benchmark: for each of "
             "sycophancy, evil and hallucination 40 prompts with a trait-expressing and a normal reply, and "
             f"{sum(r == 'benign' for r in mixed.role)} benign samples of other kinds (code, math, recipes, summaries, "
             "translations, trivia, multi-turn). Each record belongs to the `selection` or the `heldout` half "
             "(pairs kept together). For a trait, the positives are its trait replies and the negatives "
             "*everything else* (its normal replies, the other traits' replies of both kinds, the benign samples), "
             f"as a user meets it: {n_pos} positives among {len(held)} held-out samples. Every vector is read at its "
             f"recommended layer ({', '.join(f'{t} {rec[k]}' for k, t in enumerate(TRAITS))}).", "",
             "How the default was chosen: `evaluate` scored about 250 candidate scores (mean or principal components "
             "of the screened data removed, whitening, per-sample normalisation, within-cluster z-scores, "
             "prompt-residualised scores, token maximum / tail mean, layer averages, other traits' vectors projected "
             "out, scores relative to the other traits) at every layer on the **selection half only**; the rule, "
             "fixed beforehand, took the highest mean selection AUROC among candidates that read each vector at its "
             "recommended layer. That is `relative`: the sample's approximation z-scored over the screened data, "
             "minus the mean z-score of the other screened traits. A three-layer average of it scored 0.003 higher "
             "on selection; the single-layer score ships. Everything below is on the **held-out half**, which no "
             "choice saw; statistics the scores need (means, spreads) are taken from the half being scored, as a "
             "user's screen takes them from their own data.", "",
             "AUROC and precision at k (k = the trait's positives), each with a 95% stratified bootstrap interval "
             f"over samples; random: the same score with the trait's vector replaced by each of {N_RANDOM} random "
             "directions of equal norm (for `relative`, the other traits' vectors kept), mean and best of them.", "",
             "| trait | score | AUROC [95% CI] | precision@k [95% CI] | random AUROC mean / best | "
             "random precision@k mean / best |", "|---|---|---|---|---|---|"]
    for t in TRAITS:
        for label in rows:
            e = rows[label][t]
            lines.append(f"| {t} | {label} | {_fmt(e, 'auroc')} | {_fmt(e, 'p_at_k')} | "
                         f"{e['random_auroc_mean']:.2f} / {e['random_auroc_max']:.2f} | "
                         f"{e['random_p_at_k_mean']:.2f} / {e['random_p_at_k_max']:.2f} |")
    lines += ["", "Targets (issue: held-out AUROC ≥ 0.9 and precision@k ≥ 0.7 per trait): " + "; ".join(
        f"{t} {rows['relative (default)'][t]['auroc']:.2f} / {rows['relative (default)'][t]['p_at_k']:.2f} "
        f"({'met' if rows['relative (default)'][t]['auroc'] >= 0.9 and rows['relative (default)'][t]['p_at_k'] >= 0.7 else 'not met'})"
        for t in TRAITS) + ".", "",
        "The paired benchmark (`benchmarks/data/screen_eval.jsonl`: 36 prompts per trait, a trait and a normal reply "
        "each; all 216 samples screened together): AUROC of trait vs normal replies within each trait's samples, "
        "95% CI.", "", "| score | " + " | ".join(TRAITS) + " |", "|---|---|---|---|"]
    for label, per in paired_rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in per.values()) + " |")
    lines += ["", f"The library's own default screen (`guard.screen.pipeline.screen`, `ScreenConfig()`: approx mode, "
              f"score `relative`, float32) of the held-out half took {seconds:.0f} s; its scores equal the study's "
              "arrays to " + ", ".join(f"{t} {d:.1e}" for t, d, _, _ in library_check) + " (AUROC / precision@k from "
              "the library's scores: " + ", ".join(f"{t} {a:.2f} / {p:.2f}" for t, _, a, p in library_check) + ")."]
    body = "\n".join(lines)
    print(body)
    OUT.joinpath("screen_mixed_report.json").write_text(json.dumps({"mixed": rows, "paired": paired_rows,
                                                                    "library_check": library_check}, indent=1))
    if args.record:
        write_section("screening_mixed", body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--datasets", nargs="+", default=list(DATASETS))
    c.set_defaults(run=cmd_cache)
    e = sub.add_parser("evaluate")
    e.add_argument("--only", nargs="*", help="candidate families to run (prefixes)")
    e.set_defaults(run=cmd_evaluate)
    r = sub.add_parser("report")
    r.add_argument("--record", action="store_true", help="write RESULTS.md section screening_mixed")
    r.set_defaults(run=cmd_report)
    t = sub.add_parser("dtype")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--score", default=None, help="ScreenConfig.score (default: the library default)")
    t.add_argument("--note", default="", help="a sentence on the machine's load, written into the section")
    t.add_argument("--record", action="store_true", help="write RESULTS.md section screening_dtype")
    t.set_defaults(run=cmd_dtype)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
