#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| consensus_node_fuzz::snapshot::check(data));
