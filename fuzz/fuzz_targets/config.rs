//! Any bytes given to the config parser: no panic; a parsed config passes its own validation.
#![no_main]
use kmsfs::format::config::UnverifiedConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = UnverifiedConfig::parse(data) {
        config.claimed().validate().expect("parse only returns valid configs");
    }
});
