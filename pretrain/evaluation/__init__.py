"""Evaluation of what a model generates: captions of held-out images (`captioning`)."""
