"""pldr-kernels in the Hugging Face ecosystem (issue 11; needs ``pip install pldr-kernels[hf]``).

``pldr_kernels.hf.attention``: ``attn_implementation="pldr"`` for any transformers model
(docs/design.md §3.8), registered on import.
"""
