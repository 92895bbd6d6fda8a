//! The sans-I/O MLS framing parsers must never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = proto::mls::KeyPackageInfo::parse(bytes);
    let _ = proto::mls::MlsMessageInfo::parse(bytes);
});
