"""sclatent: scLDM (scalable latent diffusion for single-cell gene expression) as installable software."""

__version__ = "0.1.0"
