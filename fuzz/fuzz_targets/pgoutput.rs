//! The pgoutput (logical decoding) decoder on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| weir::fuzzing::check_pgoutput(data));
