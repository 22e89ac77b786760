//! weir's MQTT server reading a client's bytes, CONNECT and after.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| weir::fuzzing::check_mqtt(data));
