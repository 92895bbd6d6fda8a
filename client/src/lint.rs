//! Language check (being built).
