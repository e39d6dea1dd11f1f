"""Reliability tests of the store (issue 3): crashes, torn writes, I/O errors, locks."""
