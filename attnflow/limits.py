"""The limits of option values that size an allocation or an output: one rule per option, in one place.

Each ``check_*`` function is *the* definition of its option's rule. The command line's argument types
(:mod:`attnflow.cli.common`), the Python entry points (:func:`~attnflow.attention_stats`,
:func:`~attnflow.data.eval_transform`, :func:`~attnflow.models.load.load_model`, the probe's
:class:`~attnflow.probes.protocols.ProbeConfig`, :func:`~attnflow.plot.style.save_figure`, ...) and the analysis
configs (:mod:`attnflow.runner.config`) all call them, so an option means the same everywhere and a bad value is
refused, in one line naming the option, before any work starts.

==========================  =======================================================================================
option                      rule
==========================  =======================================================================================
``img_size``                an integer in ``1 ..`` :data:`MAX_IMG_SIZE` (the model must also divide it into patches)
``crop_pct``                a number in ``[``:data:`MIN_CROP_PCT` ``, 1]``: the eval transform resizes the shorter
                            side to ``img_size / crop_pct``, so below ``1 / sqrt(MAX_RESIZE_FACTOR)`` even a square
                            image would be resized to more than :data:`MAX_RESIZE_FACTOR` times the crop's pixels
images                      an image whose resize (before the crop) would hold more than :data:`MAX_RESIZE_FACTOR`
                            times the pixels of the model's input is skipped and counted like a corrupt file (an
                            extreme aspect ratio, e.g. a 1 x 100,000 px strip; see
                            :class:`attnflow.data.transforms.BoundedResize`)
``cam_curve_interval``      a number in ``[``:data:`MIN_CAM_CURVE_INTERVAL` ``, 1)``
``dpi``                     an integer in ``1 ..`` :data:`MAX_DPI`
``width`` (figure, inches)  a number in ``(0,`` :data:`MAX_FIGURE_WIDTH` ``]``
``digits``                  an integer in ``0 ..`` :data:`MAX_DIGITS`
``workers``                 an integer ``>= 0`` (0: load in the main process)
``warmup_epochs``           a finite number ``>= 0``
==========================  =======================================================================================

No torch here: the command line checks its arguments with these functions, and argument errors stay fast.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from .errors import AttnflowError

MAX_IMG_SIZE: int = 4096
"""The largest input resolution (a ViT-B/16 at 4096 px has 65,536 patches and a 17 GB attention map per head
and image); larger values are typos (100000 would try to allocate a position table of ~40 M rows)."""

MAX_RESIZE_FACTOR: int = 64
"""An image may be resized (before its center crop) to at most this many times the pixels of the model's
input; an image whose resize would be larger (an extreme aspect ratio) is skipped and counted."""

MIN_CROP_PCT: float = 1 / math.sqrt(MAX_RESIZE_FACTOR)
"""The smallest ``crop_pct`` (0.125): a square image is then resized to exactly :data:`MAX_RESIZE_FACTOR` times
the crop's pixels."""

MIN_CAM_CURVE_INTERVAL: float = 0.001
"""The finest spacing of score-map thresholds (1,000 thresholds): the hit counts and the box search grow with it."""

MAX_DPI: int = 1200
"""The highest figure resolution (print quality is 300-600 dpi); a paper-width figure at 1200 dpi is already
~8,000 px wide, and Agg refuses images of 65,536 px or more a side."""

MAX_FIGURE_WIDTH: float = 40.0
"""The widest figure, in inches (a poster); at :data:`MAX_DPI` that is 48,000 px, under Agg's limit."""

DECODES: tuple[str, ...] = ("auto", "pil", "fast", "gpu")
"""The decode words (the ``decode`` option; see :mod:`attnflow.options`), in the order help texts list them: here,
without torch, so that the command line and the analysis configs check them from the same tuple."""

MAX_DIGITS: int = 10
"""The most decimals a table prints (accuracies in percent have no meaningful digit beyond a few)."""


class OptionError(AttnflowError, ValueError):
    """An option value that cannot be used (its name and the accepted values are in the message)."""


def _refuse(name: str, rule: str, value: Any) -> OptionError:
    return OptionError(f"{name + ' ' if name else ''}must be {rule}, got {value!r}")


def _is_number(value: Any) -> TypeGuard[float]:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _is_integer(value: Any) -> TypeGuard[int]:
    return not isinstance(value, bool) and isinstance(value, int)


def _check_integer_in(name: str, value: Any, low: int, high: int, unit: str = "") -> None:
    """Refuse ``value`` unless it is an integer in ``low .. high`` (``unit``: a note after the range)."""
    if not _is_integer(value) or not low <= value <= high:
        raise _refuse(name, f"an integer in {low}..{high}{unit}", value)


def check_fraction(name: str, value: float | None, *, allow_none: bool = True) -> None:
    """Refuse a fraction outside ``(0, 1]``, NaN included.

    Raises:
        OptionError: naming the option and the value.
    """
    if value is None and allow_none:
        return
    if not _is_number(value) or math.isnan(value) or not 0 < value <= 1:
        raise _refuse(name, "a number in (0, 1]", value)


def check_crop_pct(value: float | None, *, name: str = "crop_pct", allow_none: bool = True) -> None:
    """Refuse a center-crop fraction outside ``[MIN_CROP_PCT, 1]`` (NaN included); ``None`` means the model's own.

    Raises:
        OptionError: naming the option, the range and why its lower end.
    """
    if value is None and allow_none:
        return
    if not _is_number(value) or math.isnan(value) or not MIN_CROP_PCT <= value <= 1:
        raise _refuse(name, f"a number in [{MIN_CROP_PCT:g}, 1] (the image is resized to img_size / crop_pct before "
                            f"the crop; below {MIN_CROP_PCT:g} that is over {MAX_RESIZE_FACTOR}x the crop's pixels)",
                      value)


def check_img_size(value: Any, *, name: str = "img_size") -> None:
    """Refuse an input resolution that is not an integer in ``1 .. MAX_IMG_SIZE`` (a pair of them is accepted).

    Raises:
        OptionError: naming the option and the range.
    """
    sides = value if isinstance(value, (tuple, list)) and len(value) == 2 else (value,)
    if not all(_is_integer(s) and 1 <= s <= MAX_IMG_SIZE for s in sides):
        raise _refuse(name, f"an integer in 1..{MAX_IMG_SIZE} (pixels)", value)


def check_cam_curve_interval(value: Any, *, name: str = "cam_curve_interval") -> None:
    """Refuse a score-map threshold spacing outside ``[MIN_CAM_CURVE_INTERVAL, 1)``.

    Raises:
        OptionError: naming the option and the range.
    """
    if not _is_number(value) or math.isnan(value) or not MIN_CAM_CURVE_INTERVAL <= value < 1:
        raise _refuse(name, f"a number in [{MIN_CAM_CURVE_INTERVAL:g}, 1)", value)


def check_dpi(value: Any, *, name: str = "dpi") -> None:
    """Refuse a figure resolution that is not an integer in ``1 .. MAX_DPI``.

    Raises:
        OptionError: naming the option and the range.
    """
    _check_integer_in(name, value, 1, MAX_DPI, " (dots per inch)")


def check_figure_width(value: Any, *, name: str = "width", allow_none: bool = True) -> None:
    """Refuse a figure width (inches) outside ``(0, MAX_FIGURE_WIDTH]``, NaN and infinity included.

    Raises:
        OptionError: naming the option and the range.
    """
    if value is None and allow_none:
        return
    if not _is_number(value) or not math.isfinite(value) or not 0 < value <= MAX_FIGURE_WIDTH:
        raise _refuse(name, f"a number of inches in (0, {MAX_FIGURE_WIDTH:g}]", value)


def check_digits(value: Any, *, name: str = "digits") -> None:
    """Refuse a number of decimals that is not an integer in ``0 .. MAX_DIGITS``.

    Raises:
        OptionError: naming the option and the range.
    """
    _check_integer_in(name, value, 0, MAX_DIGITS)


def check_workers(value: Any, *, name: str = "workers", allow_none: bool = True) -> None:
    """Refuse a worker count that is not an integer ``>= 0`` (``None``: the default count).

    Raises:
        OptionError: naming the option.
    """
    if value is None and allow_none:
        return
    if not _is_integer(value) or value < 0:
        raise _refuse(name, "an integer >= 0 (0: in the main process)", value)


def check_non_negative(name: str, value: Any) -> None:
    """Refuse a number that is negative, NaN or infinite (e.g. ``warmup_epochs``).

    Raises:
        OptionError: naming the option.
    """
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise _refuse(name, "a finite number >= 0", value)
