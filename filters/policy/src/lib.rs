//! The sluice policy language.
