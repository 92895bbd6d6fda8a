//! Integration tests: real gateways in-process on loopback, real mTLS, real
//! SQLite files. One test binary (see house style).

mod delivery;
mod faults;
mod idempotency;
mod negative;
