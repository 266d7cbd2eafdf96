"""The sluice demo: chapters, traffic, live view and report (run `cargo xtask demo`)."""
