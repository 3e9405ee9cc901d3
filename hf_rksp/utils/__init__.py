"""Small helpers with no knowledge of models or the method: atomic file writes and single-value checks."""
