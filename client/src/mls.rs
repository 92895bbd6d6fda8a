//! MLS client state (being built).
