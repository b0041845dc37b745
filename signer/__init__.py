"""The publisher side: keys, signing, symbol encoding, the carousel sender, HTTP publishing."""
