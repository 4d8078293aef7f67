"""The config: pydantic models of every key (`spec`), YAML reading with `extends:` and `--set`, the JSON Schema,
user blocks, renames of old keys, validation messages, and building a model from its spec (`build`: layers, their
rows, shapes, memory and loss checks). It imports `core` and the base modules, never data, runs or tools.
"""
