"""One module per diffusers architecture: a :class:`~diffalign.models.diffusers_adapter.DiffusersDenoiser`
subclass that maps the pipeline's text encoding, timestep, latent layout, schedule and VAE onto
diffalign's ``Denoiser`` contract (docs/diffusers.md). ``diffusers_options.FAMILIES`` names them."""
