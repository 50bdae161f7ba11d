"""Population training: K trials of one sweep cell trained as one stacked network."""
