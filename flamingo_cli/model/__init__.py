"""The paper's network: vision encoder, Perceiver Resampler, masking, gated cross-attention,
the LM adaptation and the `Flamingo` module that wires them. Built from in-memory parts; it
never reads files."""
