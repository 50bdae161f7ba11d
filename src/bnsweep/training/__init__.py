"""One training run: data on the device, models, the LightningModule, BN evaluation, diagnostics, checkpoints."""
