"""Verification-length policies for speculative decoding (pure: numbers in, lengths out)."""
