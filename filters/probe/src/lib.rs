//! Conformance probe filter.
