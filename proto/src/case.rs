//! The structured referral case file (being built).
