"""What an upscale costs and whether Upsampler takes it: pure arithmetic, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_OUTPUT_PIXELS = 50_000_000
MIN_CREDITS = 1.0


@dataclass(frozen=True)
class Quote:
    width: int
    height: int
    scale_factor: int
    output_width: int
    output_height: int
    output_megapixels: float
    credits: float
    cost_usd: float
    price_usd: float  # suggested retail price
    accepted: bool
    reason: str | None
    max_scale_factor: int  # the largest factor whose output fits, 0 if none does


def credits_for(output_pixels: int, credits_per_megapixel: float) -> float:
    """Upsampler's rule as its replies show it: per output megapixel, up to the next 0.01, at least 1."""
    raw = output_pixels / 1_000_000 * credits_per_megapixel
    return max(MIN_CREDITS, math.ceil(round(raw * 100, 6)) / 100)


def max_scale(width: int, height: int, limit: int = MAX_OUTPUT_PIXELS) -> int:
    if width <= 0 or height <= 0:
        return 0
    return min(16, math.isqrt(limit // (width * height)) if width * height <= limit else 0)


def suggested_price(cost_usd: float, markup_percent: float, min_price_usd: float) -> float:
    return max(min_price_usd, math.ceil(round(cost_usd * (1 + markup_percent / 100) * 100, 6)) / 100)


def quote(
    width: int,
    height: int,
    scale_factor: int,
    *,
    credits_per_megapixel: float,
    credit_price_usd: float,
    markup_percent: float = 500.0,
    min_price_usd: float = 0.50,
) -> Quote:
    out_w, out_h = width * scale_factor, height * scale_factor
    pixels = out_w * out_h
    credits = credits_for(pixels, credits_per_megapixel)
    biggest = max_scale(width, height)
    accepted = pixels <= MAX_OUTPUT_PIXELS
    reason = None
    if not accepted:
        reason = (
            f"the output would be {out_w}x{out_h} = {pixels:,} pixels, over Upsampler's limit of "
            f"{MAX_OUTPUT_PIXELS:,}; "
            + (
                f"the largest scale factor that fits is {biggest}"
                if biggest >= 2
                else "no scale factor of 2 or more fits this image"
            )
        )
    cost = round(credits * credit_price_usd, 6)
    return Quote(
        width,
        height,
        scale_factor,
        out_w,
        out_h,
        round(pixels / 1_000_000, 6),
        credits,
        cost,
        suggested_price(cost, markup_percent, min_price_usd),
        accepted,
        reason,
        biggest,
    )
