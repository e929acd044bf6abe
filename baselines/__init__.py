"""Comparison methods: PEFT adapters, FINE, WAVE, other learngene methods, full fine-tuning, scratch.

Registered in ``methods.registry`` by lazy strings; nothing imports this package directly."""
