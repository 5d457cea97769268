"""Counts that read as English in messages and reports: "1 camera", "2 cameras", "0 crops"."""

from __future__ import annotations

__all__ = ["count"]


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and `noun`, singular for exactly one: count(1, "camera") -> "1 camera", count(3, "query", "queries")
    -> "3 queries". `plural` defaults to `noun` + "s"."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
