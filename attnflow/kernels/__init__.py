"""Optional GPU kernels (Triton), imported only by the routes that use them."""

QK_KERNELS: tuple[str, ...] = ("auto", "triton", "torch")
"""Choices of ``attention_stats(qk_kernel=...)`` and ``attnflow stats --qk-kernel``."""
