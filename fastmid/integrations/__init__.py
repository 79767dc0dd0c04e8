"""Integrations of fastmid's engine with other training loops (``fastmid.integrations.hf``)."""
