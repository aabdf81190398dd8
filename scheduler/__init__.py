"""Verification-length policies for speculative decoding (pure: numbers in, lengths out)."""

from .policies import FixedPolicy, OffPolicy, VerifyPolicy, make_policy

__all__ = ["VerifyPolicy", "FixedPolicy", "OffPolicy", "make_policy"]
