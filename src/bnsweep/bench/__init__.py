"""``make bench``: speed ratios measured side by side in one run on this machine."""
