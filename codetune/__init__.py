"""codetune: fine-tune stable-code-3b on your own code, on one consumer GPU, fully local."""

__version__ = "0.1.0"
