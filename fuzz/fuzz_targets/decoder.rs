//! The JSON decoder with topic binding (a first byte 1–3 picks another
//! topic; see `DecoderCheck::check_input`).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weir::fuzzing::DecoderCheck;

static CHECK: OnceLock<DecoderCheck> = OnceLock::new();

fuzz_target!(|data: &[u8]| CHECK.get_or_init(DecoderCheck::new).check_input(data));
