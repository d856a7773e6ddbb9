"""sclatent: scLDM (scalable latent diffusion for single-cell gene expression) as installable software."""

__version__ = "0.2.0"


_API = {"Model": "api", "VAETraining": "train_vae", "PriorTraining": "train_prior", "SampleConfig": "generate"}


def __getattr__(name: str):
    # the API without importing torch for `import sclatent` alone (the CLI's --version, versions.yml)
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'sclatent' has no attribute {name!r}")


__all__ = ["Model", "PriorTraining", "SampleConfig", "VAETraining", "__version__"]
