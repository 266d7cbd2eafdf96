//! The conformance probe's observation document as the harness produces it.
