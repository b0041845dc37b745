"""The device side: receive, verify, decode, resume, fall back, hand to the installer."""
