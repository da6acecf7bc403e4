"""Integrations of dwdp_ops into other libraries' models (``transformers``: Hugging Face DeepSeek-V3)."""
