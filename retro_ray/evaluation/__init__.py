"""Evaluation: the eval stage, perplexity by neighbour overlap and zero-shot QA (``evaluate``),
the reference's and SQuAD's scoring (``scoring``), and where gold answers occur (``evidence``).
Imports every layer before it."""
