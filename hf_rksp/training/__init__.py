"""Training: the KSS loss of a batch (``kss``), the Trainer that adds it (``trainer``) and the spectral
monitor callback (``monitor``)."""
