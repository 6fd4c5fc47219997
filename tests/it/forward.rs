//! Integration tests: forward.
