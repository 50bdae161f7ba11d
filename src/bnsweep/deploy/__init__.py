"""After training: BN folded into the neighbouring layers, latency measured, a model exported."""
