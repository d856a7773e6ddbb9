"""sclatent: scLDM (scalable latent diffusion for single-cell gene expression) as installable software."""

__version__ = "0.2.0"


def __getattr__(name: str):
    # `sclatent.Model` without importing torch for `import sclatent` alone (the CLI's --version, versions.yml)
    if name == "Model":
        from .api import Model

        return Model
    raise AttributeError(f"module 'sclatent' has no attribute {name!r}")


__all__ = ["Model", "__version__"]
