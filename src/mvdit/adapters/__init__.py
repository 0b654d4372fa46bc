"""Adapters trained on top of a frozen base model (LoRA)."""
