"""What lies on disk and flows between stages: records and tensor references, the checkpoint
directory, the YAML presets. The only layer that knows file layouts."""
