"""Everything that leaves the training run: release folders (release.py), Hugging Face Llama
imports and exports (llama.py), and the staging of an output folder (staging.py)."""
