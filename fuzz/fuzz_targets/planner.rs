//! The pipeline planner: `weir check` on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| weir::fuzzing::check_planner(data));
