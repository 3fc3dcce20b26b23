"""Audio front end: file I/O and validation, log-mel spectrograms, vocoders."""
