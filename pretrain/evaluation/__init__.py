"""Evaluation during training: held-out losses (`held_out`), samples and captions (`in_loop`, `captioning`)."""
