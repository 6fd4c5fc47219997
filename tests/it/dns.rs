//! Integration tests: dns.
