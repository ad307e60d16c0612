"""The tunnel protocol: constants, frame codec, multiplexer. No I/O here."""
