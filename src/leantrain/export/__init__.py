"""Later-stage exchange formats: a trained run out as a Hugging Face folder, HF checkpoints in as a start."""
