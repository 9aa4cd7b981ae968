"""Metrics and evaluation protocols.

`text_metrics`: sentence BLEU-4 and ROUGE-L F1 on whitespace tokens, the long-text reproduction
scores of the organism report. `longform_metrics`: the μKE/AnyEdit papers' metrics as their
code computed them (character BLEU, `rouge` recall) beside sacreBLEU and ROUGE-L F1.
`sentence_encoder`: our Flax BERT for the papers' "BERTScore" (MiniLM cosine). `structured`:
the MEMIT/ZsRE protocols.
"""

from keedit_jax.eval.text_metrics import lcs_length, ngram_precision, rouge_l, sentence_bleu

__all__ = ["lcs_length", "ngram_precision", "rouge_l", "sentence_bleu"]
