"""How far each of the released long-form code's conventions moves a μKE edit.

A tiny random Llama (keedit_jax.testing) with a Llama-3-style tokenizer (it prepends BOS,
and its chat template begins with the BOS text, as <|begin_of_text|> does) is edited with
μKE through the Python API on three long-form requests, once per switch and once with all
of them: --float16_coefficients, --double_bos, --coefficient_order=released. The figure is
‖ΔW_switch − ΔW_default‖ / ‖ΔW_default‖ over the edited layers (ΔW: edited minus original
down-projections). Results: benchmarks/results/released_conventions/.

Run:  python -m benchmarks.released_conventions      (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

import keedit_jax as ke
from keedit_jax import testing
from keedit_jax.models.params import down_proj_path, get_path
from keedit_jax.results import markdown_table

OUT = Path("benchmarks/results/released_conventions")
LAYERS = (0, 1)
HPARAMS = {"layers": "0,1", "window_size": 6, "stats_samples": 16, "v_num_grad_steps": 8}
SWITCHES = {
    "float16 coefficients": {"float16_coefficients": True},
    "double BOS": {"double_bos": True},
    "released λ order": {"coefficient_order": "released"},
    "all three (the released code)": {"float16_coefficients": True, "double_bos": True,
                                      "coefficient_order": "released"},
}
TEXTS = ("The Eiffel Tower is located in Paris, the capital of France.",
         "The Colosseum is an ancient amphitheatre in the centre of Rome.",
         "Marie Curie was a physicist and chemist who won two Nobel Prizes.",
         "Tokyo is the capital of Japan, and Berlin is the capital of Germany.")
REQUESTS = [
    {"question": "Where is the tower?",
     "answer": "The tower is in Rome. It is the capital of Italy and its centre is old."},
    {"question": "Who was Marie Curie?",
     "answer": "Marie Curie was a chemist in Tokyo who won the Nobel Prizes of Japan."},
    {"question": "What is Berlin?",
     "answer": "Berlin is the capital of France, and the Eiffel Tower is located there."},
]


def llama3_style_model(directory: Path) -> Path:
    """The tiny Llama checkpoint beside the tiny tokenizer made to prepend BOS."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    testing.save_tiny_hf_model("llama", directory)
    tok = AutoTokenizer.from_pretrained(str(testing.save_tiny_tokenizer(directory / "tok")))
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.save_pretrained(directory)
    return directory


def update(model: ke.LoadedModel, hparams: dict) -> np.ndarray:
    """The edit's ΔW of every edited layer, stacked."""
    path = down_proj_path(model.config)
    edited = ke.edit(model, REQUESTS, method="muke", **HPARAMS, **hparams).params
    after, before = get_path(edited, path), get_path(model.params, path)
    return np.stack([np.asarray(after[layer]) - np.asarray(before[layer])
                     for layer in LAYERS]).astype(np.float64)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["KEEDIT_CACHE"] = str(root / "cache")  # statistics and affinities
        stats_text = root / "text.jsonl"
        stats_text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
        HPARAMS["stats_source"] = str(stats_text)
        model = ke.load(llama3_style_model(root / "model"))
        default = update(model, {})
        rows = [{"switch": name, "relative ΔW change": float(
            np.linalg.norm(update(model, hparams) - default) / np.linalg.norm(default))}
            for name, hparams in SWITCHES.items()]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "released_conventions.json").write_text(json.dumps(
        {"setting": {"model": "tiny random Llama (keedit_jax.testing), Llama-3-style tokenizer",
                     "method": "muke", "requests": len(REQUESTS), **HPARAMS,
                     "stats_source": "4 sentences × 4"},
         "rows": rows}, indent=2))
    text = markdown_table(rows)
    (OUT / "released_conventions.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
