"""Triton kernels for the statistics (:mod:`.qk_metrics`) and the route that picks them (:mod:`.route`).

Both modules import without Triton; the torch routes need none.
"""

QK_KERNELS: tuple[str, ...] = ("auto", "triton", "torch")
"""Choices of the ``qk_kernel`` option: ``attention_stats(qk_kernel=...)``, also in ``attnflow stats``."""
