//! Integration tests: real gateways in-process on loopback, real mTLS, real
//! SQLite files. One test binary (see house style).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failing test may panic

mod compat;
mod delivery;
mod disk;
mod faults;
mod idempotency;
mod negative;
mod policy;
mod referrals;
mod reload;
mod revocation;
