#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sluice_fuzz::checks::check_rate_limit_headers(data);
});
