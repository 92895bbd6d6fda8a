//! MLS framing (being built).
