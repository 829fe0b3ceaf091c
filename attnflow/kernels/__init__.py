"""Triton kernels for the statistics (:mod:`.qk_metrics`) and the route that picks them (:mod:`.route`).

Both modules import without Triton; the torch routes need none.
"""

QK_KERNELS: tuple[str, ...] = ("auto", "triton", "torch")
"""Choices of ``attention_stats(qk_kernel=...)`` and ``attnflow stats --qk-kernel``."""
