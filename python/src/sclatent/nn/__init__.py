"""Neural networks of sclatent (torch only, no file I/O): attention blocks, likelihoods, the VAE and the DiT."""
