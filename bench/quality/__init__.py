"""bench/quality: the held-out-domain fine-tuning experiment (docs/quality.md); run.py is the command."""
