"""What the benchmarks share: the machine line, RESULTS.md sections, and reusable vectors.

Benchmarks import the library and this module only, never each other."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from guard.extract.cached import load_or_extract
from guard.traits import load_trait

RESULTS = Path(__file__).with_name("RESULTS.md")
OUT = Path(__file__).parent / "out"  # vectors and SAEs reused between benchmark runs
HEADER = ("# Benchmark results\n\nEvery section is written by the script named in it, on the machine it names; "
          "rerun the command to refresh it.\n")


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def write_section(name: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = f"<!-- begin {name} -->\n{body.rstrip()}\n<!-- end {name} -->"
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def vector_for(model, tokenizer, trait_name: str, log, select_layer: bool = False):
    """The trait's vector from benchmarks/out (default preset), extracted when missing or from
    other weights; with ``select_layer``, its layer selected and stored the first time."""
    return load_or_extract(OUT / f"{trait_name}.safetensors", model, tokenizer, load_trait(trait_name),
                           select_layer=select_layer, log=log)


def vector_with_layer(model, tokenizer, trait_name: str, log):
    """:func:`vector_for` with a recommended layer."""
    return vector_for(model, tokenizer, trait_name, log, select_layer=True)
