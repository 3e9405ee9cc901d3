"""The audit as one call: options, their validation, the risk model and the run (load -> capture -> spectra
-> record -> outputs)."""
