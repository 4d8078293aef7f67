"""One way to name things in a spec: a table from `type` tags to classes, filled by a class decorator, and
beside it (for kinds a config chooses by `type`) the table of the pydantic specs users write for them."""

from __future__ import annotations


def registrar(table: dict[str, type], specs: dict[str, type] | None = None):
    """A decorator factory: `@register("tag", Spec)` sets cls.tag, puts cls in table under it and, when the
    kind has specs, Spec in specs under it (the config's union of that kind is derived from `specs`)."""

    def register(tag: str, spec: type | None = None):
        def deco(cls):
            cls.tag = tag
            table[tag] = cls
            if spec is not None:
                assert specs is not None, f"{tag}: this kind of thing has no specs"
                specs[tag] = spec
            return cls

        return deco

    return register
