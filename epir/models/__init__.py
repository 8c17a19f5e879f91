"""The project's peer models, one module each: :func:`epir.registry.load_builtin_models` imports every module
here, and each registers its model with :func:`epir.registry.register_model` (docs/extending.md)."""
