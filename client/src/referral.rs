//! Referral preparation (being built).
