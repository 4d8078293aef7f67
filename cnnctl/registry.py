"""One way to name things in a spec: a table from `type` tags to classes, filled by a class decorator."""

from __future__ import annotations


def registrar(table: dict[str, type]):
    """A decorator factory: `@register("tag")` sets cls.tag and puts cls in table under it."""

    def register(tag: str):
        def deco(cls):
            cls.tag = tag
            table[tag] = cls
            return cls

        return deco

    return register
