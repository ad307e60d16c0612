"""The relay's HTTP edge: request and response readers, the head writer, header translation."""
